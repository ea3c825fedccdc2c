"""Image loading and augmentation with PIL/numpy (no torchvision).

`load_image` accepts an image file or a frame folder (MUSIC-AVQA, AVSD: frames
extracted at 1 fps), where it takes the middle frame by sorted name.
`augment_image` applies the spec's random crop, colour jitter and horizontal flip,
except that it never flips when the question (or answer) speaks of left or right:
a flip would make the label wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, UnidentifiedImageError

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
        ImageError: missing path, or a folder without image files.
    """
    path = Path(path)
    if path.is_dir():
        frames = frame_files(path)
        if not frames:
            raise ImageError(path, "image", str(path), f"frame folder has no {'/'.join(IMAGE_SUFFIXES)} files")
        return frames[len(frames) // 2]
    if not path.is_file():
        raise ImageError(path, "image", str(path), "file not found")
    return path


def load_image(path: str | Path) -> Image.Image:
    """Open an image (or the middle frame of a frame folder) as RGB.

    Raises:
        ImageError: missing, empty folder, or unreadable/corrupt image.
    """
    file = resolve_image_path(path)
    try:
        with Image.open(file) as img:
            img.load()  # decode now: a truncated body fails here, not later
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(file, "image", file.name, f"unreadable or corrupt image ({err})") from err


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
