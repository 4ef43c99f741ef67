"""Generated inputs for the download and prepare tests: distinct images, odd and broken image files,
and archives that try to escape the folder they are unpacked into."""

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# --- Images -----------------------------------------------------------------------------------


def picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A smooth random RGB picture; different seeds give perceptual hashes far apart (>= 14 bits)."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)


def write_pictures(root: Path, per_class: dict[str, int], first_seed: int = 0) -> dict[str, list[Path]]:
    """``per_class`` distinct JPEGs in ``root/<class>/``; returns the paths per class."""
    paths, seed = {}, first_seed
    for label, count in per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        paths[label] = []
        for _ in range(count):
            path = root / label / f"img_{seed:04d}.jpg"
            picture(seed).save(path, quality=95)
            paths[label].append(path)
            seed += 1
    return paths


def near_copy(source: Path, target: Path) -> None:
    """A re-encoded copy at 7/8 of the size: different pixels, the same picture."""
    with Image.open(source) as image:
        image.resize((image.width * 7 // 8, image.height * 7 // 8)).save(target, quality=80)


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
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


HTML_PAGE = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


# --- Archives ---------------------------------------------------------------------------------


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> Path:
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
