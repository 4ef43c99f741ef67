"""Decoding image files into the pixels the models see: upright, 3-channel 8-bit sRGB.

Shared by everything that reads user images, so that what a model is trained on and what it is
asked about are decoded alike. Pillow does the work; ``to_rgb`` fixes what its plain
``convert("RGB")`` gets wrong: 16-bit values are clipped to white, float pixels in 0..1 become
black, embedded colour profiles (Adobe RGB, ProPhoto, CMYK press profiles) are ignored, and
transparent pixels keep whatever colour happens to lie under them.
"""

import functools
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # what Pillow may decode (GIF: the first frame)
# The file name suffixes of those formats, as Pillow registers them (.jpg .jpeg .jpe .jfif .png
# .apng .gif .bmp .webp .tif .tiff): what folder scans take for images.
IMAGE_SUFFIXES = frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in FORMATS)
WHITE = (255, 255, 255, 255)
SRGB = ImageCms.createProfile("sRGB")
PROFILE_SPACES = {"L": "GRAY", "RGB": "RGB", "CMYK": "CMYK"}  # the ICC colour space of each mode to_rgb converts


class Unconvertible(ValueError):
    """Pixels with no faithful 8-bit reading (float or 32-bit values outside the usual ranges)."""


def read_rgb(path: Path) -> np.ndarray:
    """The image in ``path`` as an (height, width, 3) uint8 array, EXIF orientation applied (see ``decode``)."""
    return np.asarray(decode(path)[0])


def decode(path: Path, check: Callable[[Image.Image], None] | None = None) -> tuple[Image.Image, str]:
    """The upright sRGB image in ``path`` and what became of its colour profile (``to_rgb``).

    ``check`` sees the opened image before its pixels are decoded (size checks cost nothing then).
    Raises what Pillow raises for files it cannot read (``UnidentifiedImageError``, ``OSError`` for
    truncated files, ...), ``DecompressionBombWarning`` for images too large to be sane, and
    ``Unconvertible``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd but readable files (corrupt EXIF, ...)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=FORMATS) as image:
            if check is not None:
                check(image)
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """3-channel 8-bit sRGB, and what became of the embedded colour profile.

    The second value is "" (no profile), "converted" (the pixels were converted from the profile
    to sRGB), or "unusable: <why>" when the profile cannot be read or does not fit the pixels (a
    grey profile on RGB pixels): the pixels are then taken as sRGB, as browsers do. 16-bit values
    are scaled to 8 bits, transparency is composited onto white.
    """
    profile = image.info.get("icc_profile")
    image = eight_bit(image)
    alpha = image.convert("RGBA").getchannel("A") if image.has_transparency_data else None
    colour = image.convert(image.mode if image.mode in ("L", "CMYK") else "L" if image.mode in ("1", "LA") else "RGB")
    rgb, outcome = in_srgb(colour, profile) if profile else (colour.convert("RGB"), "")
    if alpha is not None:
        rgb.putalpha(alpha)
        rgb = Image.alpha_composite(Image.new("RGBA", rgb.size, WHITE), rgb).convert("RGB")
    return rgb, outcome


def eight_bit(image: Image.Image) -> Image.Image:
    """Single-channel images of 16-bit, 32-bit or float pixels as 8-bit grey; others as they are.

    16-bit values (0..65535) are scaled; float pixels are read as 0..1 or 0..255 when all of them
    lie in that range. Anything else has no faithful 8-bit reading: ``Unconvertible``.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise Unconvertible("pixel values out of range: float pixels holding NaN or infinity")
    low, high = values.min(), values.max()
    if image.mode == "F" and low >= 0 and high <= 1:
        scale = 255.0
    elif image.mode == "F" and low >= 0 and high <= 255:
        scale = 1.0
    elif image.mode != "F" and low >= 0 and high <= 65535:
        scale = 1 / 257
    else:
        kind = "float" if image.mode == "F" else "32-bit integer"
        ranges = "0..1 nor 0..255" if image.mode == "F" else "0..65535 (16 bits)"
        raise Unconvertible(f"pixel values out of range: {kind} pixels from {low:g} to {high:g}, neither "
                            f"within {ranges}; save the image as 8- or 16-bit")
    return Image.fromarray((values * scale).round().astype(np.uint8))


def in_srgb(image: Image.Image, profile: bytes) -> tuple[Image.Image, str]:
    """``image`` (mode L, RGB or CMYK) converted from its embedded ``profile`` to sRGB RGB."""
    transform = transform_to_srgb(profile, image.mode)
    if isinstance(transform, str):
        return image.convert("RGB"), f"unusable: {transform}"
    return ImageCms.applyTransform(image, transform), "converted"


@functools.lru_cache(maxsize=64)  # photos from one camera or one editor share a profile
def transform_to_srgb(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | str:
    """The transform from ``profile`` to sRGB for ``mode`` pixels, or why there is none."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    except OSError:
        return "not a readable ICC profile"
    space = source.profile.xcolor_space.strip()
    if space != PROFILE_SPACES[mode]:
        return f"a {space} profile on {mode} pixels"
    try:
        # Perceptual intent, Pillow's and the editors' default: LUT profiles (CMYK) map their gamut
        # into sRGB's; matrix profiles (Adobe RGB, ProPhoto) have only the colorimetric mapping, clipped.
        return ImageCms.buildTransform(source, SRGB, mode, "RGB")
    except ImageCms.PyCMSError as err:  # a profile LittleCMS reads but cannot use (no A2B0 table, ...)
        return " ".join(str(err).split())
