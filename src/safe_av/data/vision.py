"""Image loading and augmentation with PIL/numpy (no torchvision).

`load_image` accepts an image file or a frame folder (MUSIC-AVQA, AVSD: frames
extracted at 1 fps), where it takes the middle frame by sorted name.
`augment_image` applies the spec's random crop, colour jitter and horizontal flip,
except that it never flips when the question (or answer) speaks of left or right:
a flip would make the label wrong.

Decoding never crashes the caller: any exception PIL raises while opening, decoding
or converting a file (truncated body, corrupt header, a header announcing more pixels
than PIL's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``) becomes an
`ImageError` naming the file, so a data loader skips and counts it like any bad file.

High-bit-depth images are rescaled to 8 bits before the RGB conversion (PIL's own
``convert("RGB")`` clips them, turning a 16-bit image white and a float image black):

* 16-bit modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): ``round(v / 257)``, so
  0..65535 maps onto 0..255 exactly;
* 32-bit integer ``I``: the same when every value lies in 0..65535 (PIL opens some
  16-bit files so), else a linear stretch of min..max onto 0..255;
* float ``F``: ``round(v * 255)`` when every value lies in [0, 1], else a linear
  stretch of min..max onto 0..255; a NaN/inf pixel is an `ImageError`.

A constant image outside those ranges (nothing to stretch) becomes black.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from safe_av.data.records import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SIDE_WORDS = re.compile(r"\b(left|right)(most|ward|wards|[- ]?hand|er)?\b", re.IGNORECASE)


class ImageError(DataError):
    """An image (or frame folder) that cannot be used."""


def frame_files(folder: str | Path) -> list[Path]:
    """Image files of a frame folder, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def resolve_image_path(path: str | Path) -> Path:
    """The image file for ``path``: itself, or the middle frame of a folder.

    Raises:
        ImageError: missing path, an unlistable folder, or a folder without image files.
    """
    path = Path(path)
    if path.is_dir():
        try:
            frames = frame_files(path)
        except OSError as err:  # e.g. no permission to list it
            raise ImageError(path, "image", str(path), f"cannot list the frame folder ({err})") from err
        if not frames:
            raise ImageError(path, "image", str(path), f"frame folder has no {'/'.join(IMAGE_SUFFIXES)} files")
        return frames[len(frames) // 2]
    if not path.is_file():
        raise ImageError(path, "image", str(path), "file not found")
    return path


def load_image(path: str | Path) -> Image.Image:
    """Open an image (or the middle frame of a frame folder) as 8-bit RGB.

    16-bit and float images are rescaled to 8 bits first (rule in the module docstring).

    Raises:
        ImageError: missing, empty folder, unreadable/corrupt image (any exception PIL raises while decoding),
            more pixels than PIL's decompression-bomb limit, or a float image with NaN/inf pixels.
    """
    file = resolve_image_path(path)
    try:  # PIL calls only: whatever they raise is a property of the file
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it (and refuses above): refuse from the limit on
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                img.load()  # decode now: a truncated body fails here, not later
                if img.mode not in WIDE_MODES:
                    return img.convert("RGB")
                wide = img.copy()  # rescaled below, outside the decoder's catch-all (a NaN pixel is its own error)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _bomb_error(file, err) from err
    except MemoryError:  # the machine, not the file
        raise
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types (struct.error, IndexError, ...)
        raise ImageError(file, "image", file.name, f"unreadable or corrupt image ({_describe(err)})") from err
    return pil_to_rgb(wide, file)


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
"""PIL modes with more than 8 bits per pixel, which `load_image` rescales itself."""


def pil_to_rgb(img: Image.Image, file: str | Path = "<PIL image>") -> Image.Image:
    """8-bit RGB from an image already open: 16-bit, 32-bit integer and float images rescaled as :func:`load_image`
    rescales files (PIL's own ``convert("RGB")`` clips them: a 16-bit image comes out almost all white).

    Raises:
        ImageError: a float image with NaN/inf pixels.
    """
    if img.mode not in WIDE_MODES:
        return img.convert("RGB")
    return Image.fromarray(to_uint8(np.asarray(img), img.mode, file)).convert("RGB")


def to_uint8(pixels: np.ndarray, mode: str, file: str | Path = "<image>") -> np.ndarray:
    """Rescale a 16-bit, 32-bit integer or float single-band image to uint8 (rule in the module docstring).

    Args:
        pixels: (H, W) array of the image.
        mode: its PIL mode, one of `WIDE_MODES`.
        file: named in the error.

    Raises:
        ImageError: a float image with NaN/inf pixels.
    """
    x = pixels.astype(np.float64)
    if not np.isfinite(x).all():
        raise ImageError(file, "pixels", "NaN/inf", f"{mode} image contains non-finite pixels")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        x = x / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        x = x * 255.0
    elif hi > lo:
        x = (x - lo) * (255.0 / (hi - lo))
    else:  # constant and outside the known ranges: nothing to stretch
        x = np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _bomb_error(file: Path, err: Exception) -> ImageError:
    """The `ImageError` of an image over PIL's pixel limit, with its pixel count and the limit when PIL gives them."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(err))
    if found is None:
        return ImageError(file, "pixels", file.name, f"too many pixels: {err}")
    return ImageError(file, "pixels", int(found.group(1)),
                      f"exceeds the limit of {int(found.group(2))} pixels (PIL decompression-bomb guard; "
                      "a huge image or a corrupt size in its header)")


def _describe(err: BaseException) -> str:
    """``str(err)``, prefixed by its type when that is not an OSError (whose text already says what failed)."""
    text = str(err) or type(err).__name__
    return text if isinstance(err, OSError) or not str(err) else f"{type(err).__name__}: {text}"


def mentions_side(*texts: str) -> bool:
    """Whether any text speaks of left/right (``left``, ``Rightmost``, ``left-hand`` ...)."""
    return any(_SIDE_WORDS.search(t or "") for t in texts)


def random_resized_crop(
    img: Image.Image, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> Image.Image:
    """Crop a random area fraction in ``scale`` with aspect in ``ratio``; resize back."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    return img.copy()


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in ``1 ± strength``."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def augment_image(
    img: Image.Image,
    question: str,
    rng: np.random.Generator,
    *,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    jitter: float = 0.2,
    answers: Sequence[str] = (),
    flip_p: float = 0.5,
) -> Image.Image:
    """Random resized crop, colour jitter, and a side-safe horizontal flip.

    Args:
        img: RGB image.
        question: the sample's question; a flip is never applied when it (or any of
            ``answers``) mentions left/right, e.g. MUSIC-AVQA "Where is the first
            sounding instrument?" → "left".
        rng: the caller's generator (deterministic augmentation).
        crop_scale: area fraction range of the crop.
        jitter: colour jitter strength (0 disables).
        answers: reference answers, checked for left/right too.
        flip_p: flip probability when flipping is allowed.

    Returns:
        A new RGB image of the same size.
    """
    out = random_resized_crop(img, rng, crop_scale)
    if jitter > 0:
        out = color_jitter(out, rng, jitter)
    flip_draw = rng.random()  # drawn always: the rng stream does not depend on the text
    if flip_draw < flip_p and not mentions_side(question, *answers):
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out
