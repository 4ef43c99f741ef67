"""Decoding image files into the pixels the models see: upright, 3-channel 8-bit RGB.

Shared by everything that reads user images, so that what a model is trained on and what it is
asked about are decoded alike. Pillow does the work; ``to_rgb`` fixes what its plain
``convert("RGB")`` gets wrong: 16-bit values are clipped to white, and transparent pixels keep
whatever colour happens to lie under them.
"""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}  # when scanning folders
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # what Pillow may decode (GIF: the first frame)
WHITE = (255, 255, 255, 255)


def read_rgb(path: Path) -> np.ndarray:
    """The image in ``path`` as an (height, width, 3) uint8 array, EXIF orientation applied.

    Raises what Pillow raises for files it cannot read (``UnidentifiedImageError``, ``OSError`` for
    truncated files, ...), and ``DecompressionBombWarning`` for images too large to be sane.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd but readable files (corrupt EXIF, ...)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=FORMATS) as image:
            return np.asarray(to_rgb(ImageOps.exif_transpose(image)))


def to_rgb(image: Image.Image) -> Image.Image:
    """3-channel 8-bit RGB: 16-bit values scaled (Pillow would clip them), transparency over white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = Image.fromarray(((np.asarray(image, dtype=np.uint32).clip(0, 65535) + 128) // 257).astype(np.uint8))
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
    return image.convert("RGB")
