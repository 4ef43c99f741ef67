"""Generated inputs for the download and prepare tests: distinct images, odd and broken image files,
colour-profiled images, and archives that try to escape the folder they are unpacked into."""

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

# --- Images -----------------------------------------------------------------------------------


def picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A smooth random RGB picture; different seeds give perceptual hashes far apart (>= 14 bits)."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)


def write_pictures(root: Path, per_class: dict[str, int], first_seed: int = 0) -> dict[str, list[Path]]:
    """``per_class`` distinct JPEGs in ``root/<class>/``; returns the paths per class."""
    paths: dict[str, list[Path]] = {}
    seed = first_seed
    for label, count in per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        paths[label] = []
        for _ in range(count):
            path = root / label / f"img_{seed:04d}.jpg"
            picture(seed).save(path, quality=95)
            paths[label].append(path)
            seed += 1
    return paths


def near_copy(source: Path, target: Path, scale: float = 7 / 8, quality: int = 80) -> None:
    """A re-encoded copy at 7/8 of the size: different pixels, the same picture."""
    with Image.open(source) as image:
        image.resize((round(image.width * scale), round(image.height * scale))).save(target, quality=quality)


def truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    picture(1000, (256, 192)).save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def png_with_alpha(path: Path) -> None:
    """Left half opaque red, right half fully transparent (its hidden colour is black)."""
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0, 255)
    Image.fromarray(pixels, "RGBA").save(path)


def png_16bit_gray(path: Path, value: int = 40000) -> None:
    Image.fromarray(np.full((48, 64), value, dtype=np.uint16)).save(path)


def cmyk_jpeg(path: Path) -> None:
    picture(1001).convert("CMYK").save(path, quality=95)


def grayscale_jpeg(path: Path) -> None:
    picture(1002).convert("L").save(path, quality=95)


def palette_png(path: Path) -> None:
    picture(1003).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)


def animated_gif(path: Path) -> None:
    """Two frames: green first, then blue."""
    green, blue = Image.new("RGB", (64, 48), (0, 255, 0)), Image.new("RGB", (64, 48), (0, 0, 255))
    green.save(path, save_all=True, append_images=[blue], duration=100, loop=0)


def exif_rotated_jpeg(path: Path) -> None:
    """Stored 80 wide x 40 high, with EXIF orientation 6: shown upright it is 40 x 80."""
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(1004, (80, 40)).save(path, quality=95, exif=exif)


def huge_png_header(path: Path, side: int = 100_000) -> None:
    """A valid PNG signature and header claiming ``side`` x ``side`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def float_tiff(path: Path, values: np.ndarray) -> None:
    """A single-channel 32-bit float TIFF (Pillow mode F) holding ``values``."""
    Image.fromarray(values.astype(np.float32)).save(path)


# --- Colour profiles --------------------------------------------------------------------------
# Minimal ICC v2 profiles built here (no profile files ship with the packages or the machine), and
# the colour maths to predict what a correct decoder shows, independently of LittleCMS.

D50 = np.array([0.9642, 1.0, 0.8249])  # the ICC profile connection space's white
SRGB_PRIMARIES = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
ADOBE_PRIMARIES = np.array([[0.5767, 0.1856, 0.1882], [0.2973, 0.6274, 0.0753], [0.0270, 0.0707, 0.9911]])
ADOBE_GAMMA = 563 / 256
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
INKS = {"C": (40, 160, 210), "M": (210, 50, 140), "Y": (245, 225, 60), "K": (40, 40, 45)}  # sRGB of each ink on white


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _icc(device: bytes, space: bytes, pcs: bytes, tags: dict[str, bytes]) -> bytes:
    start = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags.items():
        body += b"\0" * (-len(body) % 4)
        table += signature.encode() + struct.pack(">II", start + len(data), len(body))
        data += body
    header = (
        struct.pack(">I4sI", start + len(data), b"", 0x02100000)
        + device
        + space
        + pcs
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 28
        + b"".join(_s15(v) for v in D50)
        + b"\0" * 48
    )
    return header + struct.pack(">I", len(tags)) + table + data


def _common_tags(name: str) -> dict[str, bytes]:
    text = name.encode() + b"\0"
    return {
        "desc": b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 78,
        "cprt": b"text\0\0\0\0none\0",
        "wtpt": _xyz(D50),
    }


def _xyz(values) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in values)


def to_d50(matrix: np.ndarray) -> np.ndarray:
    """RGB -> XYZ primaries for a D65 white, adapted to D50 (Bradford), as ICC profiles store them."""
    d65 = matrix.sum(axis=1)
    return np.linalg.inv(BRADFORD) @ np.diag((BRADFORD @ D50) / (BRADFORD @ d65)) @ BRADFORD @ matrix


def adobe_rgb_profile() -> bytes:
    """Adobe RGB (1998): its primaries and gamma 563/256, as a matrix/TRC display profile."""
    primaries = to_d50(ADOBE_PRIMARIES)
    tags = _common_tags("Adobe RGB (1998), generated")
    tags |= {f"{c}XYZ": _xyz(primaries[:, i]) for i, c in enumerate("rgb")}
    tags |= {f"{c}TRC": b"curv\0\0\0\0" + struct.pack(">IH", 1, round(ADOBE_GAMMA * 256)) for c in "rgb"}
    return _icc(b"mntr", b"RGB ", b"XYZ ", tags)


def linear_grey_profile() -> bytes:
    """A grey profile whose values are linear light (gamma 1): 90 shows as sRGB 160, not 90."""
    tags = _common_tags("Linear grey, generated") | {"kTRC": b"curv\0\0\0\0" + struct.pack(">I", 0)}
    return _icc(b"mntr", b"GRAY", b"XYZ ", tags)


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0, 1)
    return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def srgb_decode(rgb) -> np.ndarray:
    v = np.asarray(rgb, dtype=float) / 255
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def adobe_to_srgb(rgb) -> np.ndarray:
    """What an Adobe RGB pixel looks like in sRGB (both D65: no adaptation needed)."""
    linear = np.linalg.inv(SRGB_PRIMARIES) @ ADOBE_PRIMARIES @ ((np.asarray(rgb) / 255) ** ADOBE_GAMMA)
    return srgb_encode(linear)


def ink_mix(c: int, m: int, y: int, k: int) -> np.ndarray:
    """The sRGB colour of the full inks ``c m y k`` (0 or 1 each) printed over each other on white."""
    linear = np.ones(3)
    for on, ink in zip((c, m, y, k), INKS.values()):
        linear = linear * srgb_decode(ink) if on else linear
    return srgb_encode(linear)


def _lab_bytes(rgb: np.ndarray) -> bytes:
    """sRGB -> CIE Lab (D50), in the 8-bit encoding of ICC v2 lut8 tables."""
    xyz = to_d50(SRGB_PRIMARIES) @ srgb_decode(rgb) / D50
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16) * 255 / 100, 500 * (f[0] - f[1]) + 128, 200 * (f[1] - f[2]) + 128
    return bytes(int(np.clip(round(v), 0, 255)) for v in lab)


def cmyk_profile() -> bytes:
    """A press-like CMYK -> Lab profile (lut8, 2 grid points: every ink combination), from INKS."""
    grid = b"".join(_lab_bytes(ink_mix(*corner)) for corner in np.ndindex(2, 2, 2, 2))
    ramp = bytes(range(256))
    lut = b"mft1\0\0\0\0" + bytes([4, 3, 2, 0]) + b"".join(_s15(v) for v in np.eye(3).flat) + ramp * 4 + grid + ramp * 3
    return _icc(b"prtr", b"CMYK", b"Lab ", _common_tags("CMYK inks, generated") | {"A2B0": lut})


def ink_strips(path: Path, profile: bytes | None) -> None:
    """A CMYK JPEG of five 8-px strips, no ink then each full ink alone, with ``profile`` embedded."""
    pixels = np.zeros((8, 40, 4), dtype=np.uint8)
    for i in range(4):
        pixels[:, 8 * (i + 1) : 8 * (i + 2), i] = 255
    options: dict[str, Any] = {"icc_profile": profile} if profile else {}
    Image.fromarray(pixels, "CMYK").resize((80, 40), Image.Resampling.NEAREST).save(path, quality=95, **options)


HTML_PAGE = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


# --- Archives ---------------------------------------------------------------------------------


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: Literal["w", "w:gz"] = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    picture(seed).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def zip_with(path: Path, members: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None) -> Path:
    """A zip of (name, data) files plus ``symlinks`` (name -> target) stored the way Info-ZIP does."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return path


def zip_claiming(path: Path, flag_bits: int = 0, method: int = zipfile.ZIP_STORED) -> Path:
    """A zip of ``a/ok.jpg`` and ``b/x.jpg`` whose headers for ``b/x.jpg`` claim ``flag_bits`` (bit 0:
    encrypted) and compression ``method`` (9: Deflate64), as other zip tools write them and
    Python's zipfile cannot: the flags and method fields of its local and central headers are set."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/ok.jpg", jpeg_bytes(0))
        zf.writestr("b/x.jpg", b"stored bytes, not really encrypted or compressed")
    data = bytearray(path.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the last member's headers
        start = data.rfind(signature)
        data[start + flags_at : start + flags_at + 4] = struct.pack("<HH", flag_bits, method)
    path.write_bytes(bytes(data))
    return path
