"""Image loading (file, frame folder) and side-safe augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import write_frames, write_jpg
from PIL import Image

from safe_av.data.vision import ImageError, augment_image, load_image, mentions_side


def test_load_file_as_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (10, 8), 128).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (10, 8) and img.getpixel((0, 0)) == (128, 128, 128)


def test_frame_folder_gives_middle_frame(tmp_path):
    folder = write_frames(tmp_path / "video", 5)  # frame k has red 10*k; middle is k=3
    (folder / "notes.txt").write_text("not a frame")
    red = load_image(folder).getpixel((5, 5))[0]
    assert abs(red - 30) <= 3  # JPEG rounding


def test_missing_image(tmp_path):
    with pytest.raises(ImageError, match=r"missing.jpg.*file not found"):
        load_image(tmp_path / "missing.jpg")


def test_empty_frame_folder(tmp_path):
    (tmp_path / "frames").mkdir()
    with pytest.raises(ImageError, match=r"frames.*no .*jpg"):
        load_image(tmp_path / "frames")


def test_unreadable_image(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageError, match=r"broken.jpg: field 'image'.*unreadable or corrupt"):
        load_image(path)


def test_truncated_image(tmp_path):
    good = write_jpg(tmp_path / "good.jpg", size=(64, 64))
    path = tmp_path / "truncated.jpg"
    path.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(path)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("What is the left instrument?", True),
        ("Which is the LEFTMOST one?", True),
        ("Is the violin on the right-hand side?", True),
        ("Where is the rightmost piano?", True),
        ("How many instruments are playing?", False),
        ("Is the light bright?", False),
    ],
)
def test_mentions_side(text, expected):
    assert mentions_side(text) is expected


def _half_red_half_blue(size: int = 16) -> Image.Image:
    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[:, : size // 2, 0] = 255
    a[:, size // 2 :, 2] = 255
    return Image.fromarray(a)


def _is_flipped(img: Image.Image) -> bool:
    left = np.asarray(img)[:, 0]
    return bool(left[:, 2].mean() > left[:, 0].mean())


def test_flip_only_without_side_words():
    img = _half_red_half_blue()
    kwargs = {"crop_scale": (1.0, 1.0), "jitter": 0.0}
    plain = [
        _is_flipped(augment_image(img, "How many instruments?", np.random.default_rng(s), **kwargs)) for s in range(40)
    ]
    assert 10 <= sum(plain) <= 30  # about half are flipped
    for s in range(40):
        rng = np.random.default_rng(s)
        assert not _is_flipped(augment_image(img, "What is on the Left side?", rng, **kwargs))
        rng = np.random.default_rng(s)
        assert not _is_flipped(
            augment_image(img, "Where is the first sounding instrument?", rng, answers=["right"], **kwargs)
        )


def test_augment_is_deterministic_and_keeps_size():
    img = _half_red_half_blue(32)
    a = augment_image(img, "q", np.random.default_rng(3))
    b = augment_image(img, "q", np.random.default_rng(3))
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(img))  # crop/jitter changed it


def test_decompression_bomb_header_is_an_image_error(tmp_path):
    """A BMP whose header claims 100000 x 100000 pixels: PIL's DecompressionBombError (not an OSError) becomes
    an ImageError naming the file and the pixel count against the limit, so a loader skips and counts it."""
    import struct

    path = tmp_path / "bomb.jpg"  # the suffix lies, as in a real dataset
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path, format="BMP")
    data = bytearray(path.read_bytes())
    data[18:26] = struct.pack("<ii", 100_000, 100_000)  # BITMAPINFOHEADER width, height
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert err.value.path == str(path) and err.value.field == "pixels" and err.value.value == 10_000_000_000
    assert f"exceeds the limit of {2 * Image.MAX_IMAGE_PIXELS} pixels" in err.value.reason
    assert "bomb.jpg: field 'pixels' = 10000000000" in str(err.value)


def test_any_pil_decoding_exception_is_an_image_error(tmp_path, monkeypatch):
    """Whatever PIL raises while decoding (here an IndexError from a decoder) names the file; errors outside
    PIL's calls are not hidden."""
    path = write_jpg(tmp_path / "ok.jpg")

    def broken_load(self):
        raise IndexError("tile index out of range")

    monkeypatch.setattr(Image.Image, "load", broken_load)
    with pytest.raises(ImageError, match=r"ok.jpg: field 'image'.*unreadable or corrupt image \(IndexError: tile"):
        load_image(path)

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", out_of_memory)  # the machine's problem, not the file's: not hidden
    with pytest.raises(MemoryError):
        load_image(path)
    monkeypatch.undo()
    import safe_av.data.vision as vision

    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(wide)
    monkeypatch.setattr(vision, "to_uint8", lambda *a: 1 / 0)  # our own code after PIL's: its bug surfaces
    with pytest.raises(ZeroDivisionError):
        load_image(wide)


def test_an_image_over_the_pixel_limit_but_under_twice_it_is_refused_too(tmp_path):
    """PIL only warns between MAX_IMAGE_PIXELS and twice it (and would decode up to ~0.5 GB): refused as well."""
    import struct

    path = tmp_path / "big.bmp"
    Image.new("RGB", (64, 64)).save(path, format="BMP")
    data = bytearray(path.read_bytes())
    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    data[18:26] = struct.pack("<ii", side, side)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert err.value.field == "pixels" and err.value.value == side * side
    assert f"exceeds the limit of {Image.MAX_IMAGE_PIXELS} pixels" in err.value.reason


def test_16_bit_image_is_rescaled_not_clipped(tmp_path):
    """A 0..65535 gradient keeps its gradient (v / 257), instead of PIL's convert turning it white."""
    ramp = np.linspace(0, 65535, 256 * 4).round().astype(np.uint16).reshape(4, 256)
    path = tmp_path / "depth16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_image(path))
    assert out.shape == (4, 256, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert (out[..., 0] == 255).mean() < 0.01 and abs(out.mean() - 127.5) < 1


def test_float_image_is_rescaled(tmp_path):
    """A float TIFF in [0, 1] maps v * 255; one outside [0, 1] is stretched min..max; NaN is an error."""
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(unit).save(tmp_path / "unit.tiff")
    out = np.asarray(load_image(tmp_path / "unit.tiff"))[..., 0]
    np.testing.assert_array_equal(out, np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    wide = np.linspace(-1000, 3000, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(wide).save(tmp_path / "wide.tiff")
    out = np.asarray(load_image(tmp_path / "wide.tiff"))[..., 0]
    assert out.min() == 0 and out.max() == 255 and out[0, 1] == 4  # (-1000 + 63.49 + 1000) * 255 / 4000 -> 4
    bad = unit.copy()
    bad[0, 0] = np.nan
    Image.fromarray(bad).save(tmp_path / "nan.tiff")
    with pytest.raises(ImageError, match=r"nan.tiff: field 'pixels' = 'NaN/inf': F image contains non-finite"):
        load_image(tmp_path / "nan.tiff")
