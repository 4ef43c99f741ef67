"""A photo becomes the model's input here, and only here: decoding and geometry.

``model_input(file, size)`` is what the model sees of a photo: decoded upright, 3-channel 8-bit
sRGB (``decode``), then its central square, the shorter side scaled to ``size`` pixels with
antialiasing (``central_square``: Lanczos, from at least twice the size). Every path from a file
to the model goes through it: the augment stage's copy 0 of every image (what training, validation
and the features see unaugmented), the model server (pipeline/serving.py), evaluate (through the
server's own function, so the reported metrics are the served ones), export's parity check and
``pipeline.tools.predict``. The same file gives the same pixels on each path; the augment stage's
copy 0 comes from prepare's re-encoded copy (shorter side at most ``prepare.max_side``), so it
differs from the served pixels by about one JPEG encoding (tests/test_augment.py).

Shapes: a non-square photo loses the ends of its longer side, equally on both sides, whatever its
aspect ratio. Training never sees such crops of extreme photos: prepare quarantines images whose
longer side is more than ``prepare.max_aspect_ratio`` times the shorter (a 6000x400 panorama, a
40x20000 strip); the served path crops them all the same (the model has one square input).

Pillow does the decoding; ``to_rgb`` fixes what its plain ``convert("RGB")`` gets wrong: 16-bit
values are clipped to white, float pixels in 0..1 become black, embedded colour profiles (Adobe
RGB, ProPhoto, CMYK press profiles) are ignored, and transparent pixels keep whatever colour
happens to lie under them.
"""

import functools
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np
from PIL import Image, ImageCms, ImageOps

from pipeline.paths import JPEG_QUALITY

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # what Pillow may decode (GIF: the first frame)
# The file name suffixes of those formats, as Pillow registers them (.jpg .jpeg .jpe .jfif .png
# .apng .gif .bmp .webp .tif .tiff): what folder scans take for images.
IMAGE_SUFFIXES = frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in FORMATS)
WHITE = (255, 255, 255, 255)
SRGB = ImageCms.createProfile("sRGB")
PROFILE_SPACES = {"L": "GRAY", "RGB": "RGB", "CMYK": "CMYK"}  # the ICC colour space of each mode to_rgb converts
# Downscaling filter: Pillow's filters antialias (their support widens with the scale), Lanczos is the
# sharpest. REDUCING_GAP: shrink by a whole factor with a box filter first while the rest of the way
# stays at least this factor (Pillow's docs: 3.0 is indistinguishable from the full filter).
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: a 4000x3000 photo 3.5x faster)
# when that leaves at least DRAFT_MARGIN times the size a side: the Lanczos step then always does a
# real reduction, so a photo and prepare's smaller copy of it end up within JPEG rounding of each other.
DRAFT_MARGIN = 2
Source = Path | BinaryIO  # a file, or its bytes in a BytesIO


class Unconvertible(ValueError):
    """Pixels with no faithful 8-bit reading (float or 32-bit values outside the usual ranges)."""


def model_input(source: Source, size: int, check: Callable[[Image.Image], None] | None = None) -> np.ndarray:
    """The photo in ``source`` as the model's input: a (size, size, 3) uint8 array (see the module
    docstring). ``check`` and the errors raised: as in ``decode``."""
    image, _ = decode(source, check, at_least=DRAFT_MARGIN * size)
    return np.asarray(central_square(image, size))


def central_square(image: Image.Image, size: int) -> Image.Image:
    """The central square of ``image``, scaled to ``size`` pixels a side with antialiasing (any
    upscaling of a smaller image with the same filter)."""
    width, height = image.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return image.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def shorter_side_at_most(image: Image.Image, limit: int) -> Image.Image:
    """``image`` scaled down so that its shorter side is ``limit`` pixels, when it is longer."""
    width, height = image.size
    if min(width, height) <= limit:
        return image
    scale = limit / min(width, height)
    return image.resize((round(width * scale), round(height * scale)), RESAMPLE, reducing_gap=REDUCING_GAP)


def save_jpeg(image: Image.Image, target: Path | BinaryIO) -> None:
    """The JPEG the stages write: quality JPEG_QUALITY without chroma subsampling (4:4:4), which
    halves the difference a re-encoding makes to detailed small images (colour edges)."""
    image.save(target, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def read_rgb(path: Path) -> np.ndarray:
    """The image in ``path`` as an (height, width, 3) uint8 array, EXIF orientation applied (see ``decode``)."""
    return np.asarray(decode(path)[0])


def decode(
    source: Source, check: Callable[[Image.Image], None] | None = None, at_least: int | None = None
) -> tuple[Image.Image, str]:
    """The upright sRGB image in ``source`` and what became of its colour profile (``to_rgb``).

    ``check`` sees the opened image before its pixels are decoded (size checks cost nothing then).
    ``at_least``: a JPEG may be decoded at a smaller scale (1/2, 1/4, 1/8) that leaves at least this
    many pixels a side (other formats always decode whole). Raises what Pillow raises for files it
    cannot read (``UnidentifiedImageError``, ``OSError`` for truncated files, ...),
    ``DecompressionBombWarning`` for images too large to be sane, and ``Unconvertible``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd but readable files (corrupt EXIF, ...)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source, formats=FORMATS) as image:
            if check is not None:
                check(image)
            if at_least is not None:
                image.draft(None, (at_least, at_least))  # the same scale whatever the EXIF orientation
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
        raise Unconvertible(
            f"pixel values out of range: {kind} pixels from {low:g} to {high:g}, neither "
            f"within {ranges}; save the image as 8- or 16-bit"
        )
    return Image.fromarray((values * scale).round().astype(np.uint8))


def in_srgb(image: Image.Image, profile: bytes) -> tuple[Image.Image, str]:
    """``image`` (mode L, RGB or CMYK) converted from its embedded ``profile`` to sRGB RGB."""
    transform = transform_to_srgb(profile, image.mode)
    if isinstance(transform, str):
        return image.convert("RGB"), f"unusable: {transform}"
    return cast(Image.Image, ImageCms.applyTransform(image, transform)), "converted"  # None only in place


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
