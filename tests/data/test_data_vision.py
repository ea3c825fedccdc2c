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
