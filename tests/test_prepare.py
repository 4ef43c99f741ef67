"""prepare: every image decoded once into RGB, bad ones quarantined, duplicates and label conflicts
handled, and a deterministic, stable, leak-free stratified split.

The stage runs in-process in a throw-away folder holding params.yaml and a generated data/raw.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fixtures_bad as bad
from conftest import REPO, make_digits, set_params
from pipeline.cli import UserError
from pipeline.data.images import read_rgb
from pipeline.data.manifests import read_manifest
from pipeline.sources import dedupe
from pipeline.sources.layouts import Record
from pipeline.stages import prepare

RAW = Path("data/raw")
PREPARED = Path("data/prepared")


def run_prepare(**params) -> dict:
    if params:
        set_params(Path.cwd(), **params)
    prepare.main()
    return json.loads(Path("reports/data.json").read_text())


def refused(**params) -> str:
    with pytest.raises(UserError) as err:
        run_prepare(**params)
    assert "\n" not in str(err.value)
    assert not PREPARED.exists()
    return str(err.value)


def manifest() -> dict[str, dict[str, str]]:
    """Manifest rows by source."""
    return {row["source"]: row for row in read_manifest(PREPARED / "manifest.csv")}


def quarantine() -> dict[str, str]:
    return {row["source"]: row["reason"] for row in read_manifest(PREPARED / "quarantine.csv")}


def normalized(row: dict[str, str]) -> np.ndarray:
    with Image.open(PREPARED / row["path"]) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        return np.asarray(image).astype(int)


# --- Decoding ---------------------------------------------------------------------------------


def test_every_supported_kind_becomes_an_upright_rgb_jpeg(workdir):
    bad.write_pictures(RAW, {"odd": 3, "plain": 8})
    odd = RAW / "odd"
    bad.png_with_alpha(odd / "alpha.png")
    bad.png_16bit_gray(odd / "gray16.png", value=40000)
    bad.cmyk_jpeg(odd / "cmyk.jpg")
    bad.grayscale_jpeg(odd / "gray.jpg")
    bad.palette_png(odd / "palette.png")
    bad.animated_gif(odd / "anim.gif")
    bad.exif_rotated_jpeg(odd / "rotated.jpg")
    for seed, suffix in ((2001, "bmp"), (2002, "webp"), (2003, "tiff")):
        bad.picture(seed).save(odd / f"pic.{suffix}")
    run_prepare()
    rows = manifest()
    assert quarantine() == {}
    for name in (
        "alpha.png",
        "gray16.png",
        "cmyk.jpg",
        "gray.jpg",
        "palette.png",
        "anim.gif",
        "rotated.jpg",
        "pic.bmp",
        "pic.webp",
        "pic.tiff",
    ):
        assert rows[f"odd/{name}"]["label"] == "odd"
        normalized(rows[f"odd/{name}"])
    alpha = normalized(rows["odd/alpha.png"])
    assert np.abs(alpha[32, 4] - [255, 0, 0]).max() < 8  # opaque red stays red
    assert np.abs(alpha[32, 60] - [255, 255, 255]).max() < 8  # transparent becomes white, not black
    assert np.abs(normalized(rows["odd/gray16.png"]) - round(40000 / 257)).max() < 4  # scaled, not clipped to 255
    assert np.abs(normalized(rows["odd/anim.gif"])[10, 10] - [0, 255, 0]).max() < 8  # the first frame
    rotated = rows["odd/rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == ("40", "80")
    assert normalized(rotated).shape == (80, 40, 3)


def test_normalized_images_have_their_shorter_side_bounded_by_max_side(workdir):
    bad.write_pictures(RAW, {"a": 4, "b": 4})
    bad.picture(3000, (300, 120)).save(RAW / "a" / "wide.png")
    bad.picture(3001, (90, 240)).save(RAW / "b" / "tall.png")
    run_prepare(**{"prepare.max_side": 100})
    rows = manifest()
    assert (rows["a/wide.png"]["width"], rows["a/wide.png"]["height"]) == ("300", "120")
    # The shorter side at max_side, not the longer: the model's central square keeps 100 pixels a side.
    assert normalized(rows["a/wide.png"]).shape == (100, 250, 3)
    assert normalized(rows["b/tall.png"]).shape == (240, 90, 3)  # shorter side below max_side: as it is
    assert normalized(rows["a/img_0000.jpg"]).shape == (72, 96, 3)


def test_elongated_and_oversized_images_are_quarantined_with_their_reason(workdir):
    bad.write_pictures(RAW, {"a": 5, "b": 5})
    bad.picture(3000, (6000, 400)).save(RAW / "a" / "panorama.jpg")
    bad.picture(3001, (40, 20000)).save(RAW / "b" / "strip.png")
    bad.picture(3002, (400, 100)).save(RAW / "b" / "four_to_one.jpg")  # at the limit: used
    bad.huge_png_header(RAW / "a" / "huge.png", side=8000)  # 64 Mpx: under Pillow's bomb limit, over the server's
    report = run_prepare()
    assert quarantine() == {
        "a/panorama.jpg": "too elongated: 6000x400 pixels, one side 15.0 times the other, above "
        "prepare.max_aspect_ratio=4 (the model sees the central square)",
        "b/strip.png": "too elongated: 40x20000 pixels, one side 500.0 times the other, above "
        "prepare.max_aspect_ratio=4 (the model sees the central square)",
        "a/huge.png": "too large: 8000x8000 pixels (64.0 megapixels), larger than 50 megapixels "
        "(prepare.max_pixels=50000000)",
    }
    assert report["quarantined_by_reason"] == {"too elongated": 2, "too large": 1}
    assert "b/four_to_one.jpg" in manifest()
    run_prepare(**{"prepare.max_aspect_ratio": 20})
    assert set(quarantine()) == {"b/strip.png", "a/huge.png"}


def test_bad_images_are_quarantined_with_their_reason(workdir):
    bad.write_pictures(RAW, {"a": 5, "b": 5})
    bad.truncated_jpeg(RAW / "a" / "truncated.jpg")
    (RAW / "a" / "empty.jpg").write_bytes(b"")
    (RAW / "a" / "page.jpg").write_bytes(bad.HTML_PAGE)
    Image.new("RGB", (1, 1), "red").save(RAW / "b" / "pixel.png")
    bad.huge_png_header(RAW / "b" / "bomb.png")
    report = run_prepare()
    reasons = quarantine()
    assert reasons["a/truncated.jpg"].startswith("truncated: image file is truncated")
    assert reasons["a/empty.jpg"] == "empty file"
    assert reasons["a/page.jpg"].startswith(
        "not an image: a JPEG/PNG/GIF/BMP/WEBP/TIFF file does not start with b'<!DOCTYPE"
    )
    assert reasons["b/pixel.png"] == "too small: 1x1 pixels, below prepare.min_side=32"
    assert reasons["b/bomb.png"] == (
        "too large: 100000x100000 pixels (10000.0 megapixels), larger than 50 megapixels (prepare.max_pixels=50000000)"
    )
    assert report["quarantined"] == 5 and report["images"] == 10
    assert report["quarantined_by_reason"] == {
        "empty file": 1,
        "not an image": 1,
        "too large": 1,
        "too small": 1,
        "truncated": 1,
    }
    assert all((RAW / source).exists() for source in reasons)  # quarantined, never deleted
    assert not set(reasons) & set(manifest())


def test_a_genuine_large_image_is_used_and_prepare_max_pixels_sets_the_limit(workdir):
    bad.write_pictures(RAW, {"a": 5, "b": 5})
    Image.new("L", (10_000, 4_500), 200).save(RAW / "a" / "scan.png")  # 45 Mpx: Pillow alone calls it a bomb
    assert run_prepare()["images"] == 11
    assert run_prepare(**{"prepare.max_pixels": 40_000_000})["quarantined_by_reason"] == {"too large": 1}
    assert quarantine() == {
        "a/scan.png": "too large: 10000x4500 pixels (45.0 megapixels), larger than 40 megapixels "
        "(prepare.max_pixels=40000000)"
    }
    # More than the model server decodes is refused: such test images could not be served.
    with pytest.raises(UserError, match="prepare.max_pixels: Input should be less than or equal to 50000000"):
        run_prepare(**{"prepare.max_pixels": 90_000_000})


def test_names_hidden_and_ignored_files(workdir):
    spaced = "rose\u0301 rouge"  # decomposed (NFD) 'rosé rouge', as macOS writes it
    bad.write_pictures(RAW, {spaced: 4, "tulips": 5})
    bad.picture(4000).save(RAW / spaced / os.fsdecode(b"caf\xe9.jpg"))  # not valid UTF-8
    bad.picture(4001).save(RAW / "tulips" / "花 1.jpg")
    (RAW / "tulips" / "deeper" / "deepest").mkdir(parents=True)
    bad.picture(4002).save(RAW / "tulips" / "deeper" / "deepest" / "nested.jpg")
    ignored = [
        "LICENSE.txt",
        "tulips/README.md",
        "tulips/LICENSE",
        "tulips/notes.txt",
        "tulips/.DS_Store",
        "tulips/.hidden.jpg",
        ".cache/x.jpg",
        "__MACOSX/tulips/._x.jpg",
        "tulips/.thumbs/y.jpg",
    ]
    for name in ignored:
        (RAW / name).parent.mkdir(parents=True, exist_ok=True)
        (RAW / name).write_bytes(bad.jpeg_bytes(5000))
    (RAW / "linked").symlink_to((RAW / "tulips").resolve(), target_is_directory=True)
    report = run_prepare()
    rows = manifest()
    assert json.loads((PREPARED / "labels.json").read_text()) == ["rosé rouge", "tulips"]
    assert rows[f"{spaced}/caf\\xe9.jpg"]["label"] == "rosé rouge"  # source: the file's own name
    assert rows["tulips/花 1.jpg"]["label"] == "tulips"
    assert rows["tulips/deeper/deepest/nested.jpg"]["label"] == "tulips"  # sub-folders belong to their class
    assert (PREPARED / rows["tulips/花 1.jpg"]["path"]).is_file()
    assert report["ignored_files"] == len(ignored) + 1  # + the symlinked folder
    assert report["images"] == 12 and quarantine() == {}
    why = {row["source"]: row["reason"] for row in read_manifest(PREPARED / "ignored.csv")}
    assert set(why) == {*ignored, "linked"}
    assert (why["LICENSE.txt"], why["tulips/.DS_Store"], why["linked"]) == (
        "licence or readme",
        "hidden: the name starts with '.'",
        "symlinked folder: not followed (a link may loop)",
    )
    assert why["tulips/notes.txt"] == "not an image file name: suffix '.txt'"


def test_every_file_left_out_is_listed_by_name_with_its_reason(workdir, capsys):
    bad.write_pictures(RAW, {"cars": 4, "tulips": 4})
    used = [
        "cars/license_plate_01.jpg",
        "cars/README_first.png",
        "cars/LICENSE.jpg",
        "tulips/a.jfif",
        "tulips/b.JPE",
        "tulips/c.apng",
    ]  # image suffixes Pillow decodes; names that only look like documents
    for i, name in enumerate(used):
        bad.picture(6000 + i).save(RAW / name, format="PNG" if name.endswith(("png", "apng")) else "JPEG")
    left_out = {
        "LICENSE": "licence or readme",
        "cars/LICENSE.md": "licence or readme",
        "cars/readme.txt": "licence or readme",
        "COPYING": "licence or readme",
        "stray.jpg": "outside the class folders: no class folder above it",
        "notes.txt": "not an image file name: suffix '.txt'",
        "cars/scan.heic": "not an image file name: suffix '.heic'",
        "cars/Makefile": "not an image file name: no suffix",
        ".ipynb_checkpoints/cars/x-checkpoint.jpg": "hidden: in the hidden folder .ipynb_checkpoints/",
        ".git/objects/ab": "hidden: in the hidden folder .git/",
        "tulips/.thumbs/y.jpg": "hidden: in the hidden folder tulips/.thumbs/",
        "tulips/.z.jpg": "hidden: the name starts with '.'",
    }
    for i, name in enumerate(left_out):
        (RAW / name).parent.mkdir(parents=True, exist_ok=True)
        (RAW / name).write_bytes(bad.jpeg_bytes(7000 + i))
    os.mkfifo(RAW / "cars" / "pipe.jpg")  # opening it would block for ever
    (RAW / "tulips" / "gone.jpg").symlink_to(RAW / "nowhere.jpg")
    (RAW / "cars" / "more").symlink_to((RAW / "tulips").resolve(), target_is_directory=True)
    left_out |= {
        "cars/pipe.jpg": "not a regular file: a broken link, FIFO, socket or device",
        "tulips/gone.jpg": "not a regular file: a broken link, FIFO, socket or device",
        "cars/more": "symlinked folder: not followed (a link may loop)",
    }
    report = run_prepare()
    assert set(used) <= set(manifest())
    listed = {row["source"]: row["reason"] for row in read_manifest(PREPARED / "ignored.csv")}
    assert listed == left_out
    on_disk = {str(p.relative_to(RAW)) for p in RAW.rglob("*") if p.is_symlink() or not p.is_dir()}
    assert on_disk == set(manifest()) | set(listed)  # every file is used or listed, none vanishes
    assert report["ignored_by_reason"] == {
        "hidden": 4,
        "licence or readme": 4,
        "not a regular file": 2,
        "not an image file name": 3,
        "outside the class folders": 1,
        "symlinked folder": 1,
    }
    assert f"{len(left_out)} files ignored (see data/prepared/ignored.csv)" in capsys.readouterr().out


def test_a_class_without_usable_images_says_what_was_left_out(workdir):
    bad.write_pictures(RAW, {"a": 5, "b": 5})
    (RAW / "scans").mkdir()
    for name in ("1.heic", "2.heic"):
        (RAW / "scans" / name).write_bytes(b"\0\0\0\x18ftypheic")
    (RAW / "scans" / "3.jpg").write_bytes(b"")
    assert (
        "'scans' (train 0, val 0, test 0; 3 files not used, the first: scans/1.heic: not an image file name: "
        "suffix '.heic')" in refused()
    )


def test_folder_names_alike_but_for_their_unicode_form_or_case_warn(workdir, capsys):
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # both shown as café; macOS writes the second
    bad.write_pictures(RAW, {composed: 3, decomposed: 3, "Tea": 4, "tea": 4})
    report = run_prepare()
    assert json.loads((PREPARED / "labels.json").read_text()) == ["Tea", "café", "tea"]
    assert report["per_class"]["café"] == {"train": 4, "val": 1, "test": 1}  # one class, as on macOS
    assert {row["label"] for row in manifest().values() if row["source"].startswith(decomposed)} == {composed}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: 1 class(es) merge names that differ only in their Unicode form (NFC/NFD, one name to Unicode and "
        "to macOS): 'café' from 'cafe\\u0301' and 'caf\\xe9'; rename one if they are different classes",
        "warning: 1 group(s) of classes differ only in case and stay apart: 'Tea' and 'tea' (a case-insensitive file "
        "system, macOS or Windows, would merge their folders)",
    ]


# --- Pixel values and colour ------------------------------------------------------------------


def test_float_pixels_are_scaled_by_their_range_or_quarantined(workdir):
    bad.write_pictures(RAW, {"a": 4, "b": 4})
    ramp = np.linspace(0, 1, 48 * 64).reshape(48, 64)
    bad.float_tiff(RAW / "a" / "unit.tif", ramp)  # 0..1: Pillow alone makes it black
    bad.float_tiff(RAW / "a" / "bytes.tif", np.full((48, 64), 200.0))  # 0..255
    bad.float_tiff(RAW / "b" / "hdr.tif", ramp * 1000 - 5)
    bad.float_tiff(RAW / "b" / "nan.tif", np.where(ramp > 0.5, np.nan, ramp))
    Image.fromarray(np.full((48, 64), 1 << 20, dtype=np.int32)).save(RAW / "b" / "int32.tif")
    run_prepare()
    rows = manifest()
    unit = normalized(rows["a/unit.tif"])
    assert np.abs(unit[:, :, 0] - (ramp * 255).round()).max() < 8 and unit.max() > 240
    assert np.abs(normalized(rows["a/bytes.tif"]) - 200).max() < 3
    assert quarantine() == {
        "b/hdr.tif": "pixel values out of range: float pixels from -5 to 995, neither within 0..1 nor 0..255; "
        "save the image as 8- or 16-bit",
        "b/nan.tif": "pixel values out of range: float pixels holding NaN or infinity",
        "b/int32.tif": "pixel values out of range: 32-bit integer pixels from 1.04858e+06 to 1.04858e+06, neither "
        "within 0..65535 (16 bits); save the image as 8- or 16-bit",
    }


def test_colour_profiles_are_converted_to_srgb(workdir, capsys):
    bad.write_pictures(RAW, {"a": 20, "b": 5})  # the 4 near-flat pictures below are near-duplicates: one split
    adobe = (150, 60, 60)
    Image.new("RGB", (64, 48), adobe).save(RAW / "a" / "adobe.jpg", quality=95, icc_profile=bad.adobe_rgb_profile())
    bad.ink_strips(RAW / "a" / "cmyk.jpg", bad.cmyk_profile())
    Image.new("RGB", (64, 48), adobe).save(RAW / "a" / "broken.jpg", quality=95, icc_profile=b"not a profile")
    Image.new("L", (64, 48), 90).save(RAW / "a" / "grey.png", icc_profile=bad.adobe_rgb_profile())  # RGB profile
    Image.new("L", (64, 48), 90).save(RAW / "b" / "linear.png", icc_profile=bad.linear_grey_profile())
    report = run_prepare()
    rows = manifest()
    expected = bad.adobe_to_srgb(adobe)
    assert np.abs(expected - adobe).max() > 20  # what ignoring the profile costs
    assert np.abs(normalized(rows["a/adobe.jpg"])[24, 32] - expected).max() <= 3
    assert np.abs(read_rgb(RAW / "a" / "adobe.jpg")[24, 32] - expected).max() <= 3  # predict decodes alike
    strips = normalized(rows["a/cmyk.jpg"])[20, 8::16]
    inks = [bad.ink_mix(*(int(i == ink) for i in range(4))) for ink in range(-1, 4)]  # paper, then C, M, Y, K
    assert np.abs(strips - inks).max() <= 6, strips  # Pillow alone: pure cyan (0, 255, 255), ...
    assert np.abs(normalized(rows["a/broken.jpg"])[24, 32] - adobe).max() <= 3  # kept, taken as sRGB
    assert np.abs(normalized(rows["a/grey.png"]) - 90).max() <= 1
    assert np.abs(normalized(rows["b/linear.png"]) - bad.srgb_encode(90 / 255)).max() <= 2  # 160
    assert report["colour_profiles"] == {"converted": 3, "unusable": 2}
    notes = [line for line in capsys.readouterr().err.splitlines() if "colour profile" in line]
    assert notes == [
        "note: 2 images have a colour profile that cannot be used (the first: not a readable ICC "
        "profile); their pixels are taken as sRGB: a/broken.jpg, a/grey.png"
    ]


# --- Classes, duplicates and conflicts --------------------------------------------------------


def test_empty_class_folder_fails(workdir):
    bad.write_pictures(RAW, {"a": 5, "b": 5})
    (RAW / "empty").mkdir()
    assert refused() == (
        "too few usable images to put one in each of train, val and test in 1 of 3 classes (prepare.split val 0.15, "
        "test 0.15; near-duplicates count as one; each class needs at least 4): 'empty' (train 0, val 0, test 0): "
        "add images or remove those classes"
    )


def test_one_class_only_fails(workdir):
    bad.write_pictures(RAW, {"a": 5})
    assert "data/raw has 1 class folder(s) ['a']; need at least 2" in refused()


def test_class_too_small_for_the_split_fails(workdir):
    bad.write_pictures(RAW, {"a": 5, "b": 3})
    assert "in 1 of 2 classes" in refused() and "'b' (train 3, val 0, test 0)" in refused()


def test_same_image_in_two_classes_is_excluded_and_leaves_no_files(workdir):
    paths = bad.write_pictures(RAW, {"roses": 6, "tulips": 6})
    shutil.copy(paths["roses"][0], RAW / "tulips" / "same.jpg")
    shutil.copy(paths["roses"][1], RAW / "roses" / "z_again.jpg")  # an exact duplicate within one class
    report = run_prepare()
    conflict = "label conflict: the same image is in classes roses, tulips"
    assert quarantine() == {"roses/img_0000.jpg": conflict, "tulips/same.jpg": conflict}
    rows = manifest()
    assert "roses/img_0000.jpg" not in rows and "tulips/same.jpg" not in rows
    assert "roses/img_0001.jpg" in rows and "roses/z_again.jpg" not in rows  # the first name is kept
    assert read_manifest(PREPARED / "duplicates.csv") == [
        {"source": "roses/z_again.jpg", "label": "roses", "kind": "exact", "same_as": "roses/img_0001.jpg"}
    ]
    on_disk = sorted(str(p.relative_to(PREPARED)) for p in (PREPARED / "images").rglob("*") if p.is_file())
    assert on_disk == sorted(row["path"] for row in rows.values())  # no orphaned normalized copies
    assert sorted(p.name for p in PREPARED.iterdir()) == [
        "duplicates.csv",
        "ignored.csv",
        "images",
        "labels.json",
        "manifest.csv",
        "quarantine.csv",
    ]
    assert (report["images"], report["quarantined"], report["duplicates_dropped"]) == (14 - 2 - 1, 2, 1)


# --- Splitting --------------------------------------------------------------------------------


def test_split_is_stratified_and_byte_identical_when_repeated(workdir):
    bad.write_pictures(RAW, {"a": 20, "b": 34})
    report = run_prepare()
    first = (PREPARED / "manifest.csv").read_bytes()
    assert report["per_class"] == {"a": {"train": 14, "val": 3, "test": 3}, "b": {"train": 24, "val": 5, "test": 5}}
    assert (report["layout"], report["splits_given"]) == ("class_folders", [])
    run_prepare()
    assert (PREPARED / "manifest.csv").read_bytes() == first
    reseeded = run_prepare(seed=7)
    assert reseeded["per_class"] == report["per_class"] and (PREPARED / "manifest.csv").read_bytes() != first


def test_adding_images_moves_at_most_the_boundary_images_of_their_class(workdir):
    bad.write_pictures(RAW, {"a": 40, "b": 40})
    run_prepare()
    before = {source: row["split"] for source, row in manifest().items()}
    bad.write_pictures(RAW / "more", {"a": 3}, first_seed=500)
    for path in (RAW / "more" / "a").iterdir():
        path.rename(RAW / "a" / path.name)
    (RAW / "more" / "a").rmdir()
    (RAW / "more").rmdir()
    run_prepare()
    after = {source: row["split"] for source, row in manifest().items()}
    assert set(after) == set(before) | {f"a/img_{i:04d}.jpg" for i in (500, 501, 502)}
    moved = [source for source in before if after[source] != before[source]]
    assert not [source for source in moved if source.startswith("b/")]
    assert len(moved) <= 2 * 3


def test_near_duplicates_never_straddle_splits(workdir):
    paths = bad.write_pictures(RAW, {"a": 30, "b": 30})
    pairs = [(paths["a"][i], RAW / "a" / f"near_{i}.jpg") for i in range(12)]
    pairs.append((paths["a"][20], RAW / "b" / "near_across.jpg"))  # a near-copy filed under another class
    for original, copy in pairs:
        bad.near_copy(original, copy)
    report = run_prepare()
    rows = manifest()
    near = read_manifest(PREPARED / "duplicates.csv")
    assert len(near) == len(pairs) and {row["kind"] for row in near} == {"near"}
    for original, copy in pairs:
        first, second = (str(p.relative_to(RAW)) for p in (original, copy))
        assert rows[first]["split"] == rows[second]["split"], (first, second)
    assert report["near_duplicate_groups"] == len(pairs) and report["largest_near_duplicate_group"] == 2
    assert len({rows[str(copy.relative_to(RAW))]["split"] for _, copy in pairs}) > 1  # not all in one split


def test_low_detail_images_keep_the_split_fractions_of_every_class(workdir, capsys):
    """2,000 digits, given train/ and test/ like MNIST: their hashes would chain most of them into one
    near-duplicate group, which went whole to one split (val 53,160 of 60,000 on the real dataset)."""
    make_digits(RAW / "train", 170)
    make_digits(RAW / "test", 30, seed=1)
    report = run_prepare(**{"prepare.min_side": 28})
    for label, counts in report["per_class"].items():
        pool = counts["train"] + counts["val"]
        assert abs(counts["val"] / pool - 0.15) <= 0.01 and abs(counts["train"] / pool - 0.85) <= 0.01, (label, counts)
        assert counts["test"] == 30
    assert report["largest_near_duplicate_group"] <= 20, report  # 1 % of the images; 1,552 before
    assert "prepare: split folders train/, test/ (val drawn from train)" in capsys.readouterr().out


@pytest.mark.parametrize("distance", [0, 3, 6, 10])
def test_near_pair_search_finds_exactly_the_pairs_every_pair_comparison_finds(distance):
    rng = np.random.default_rng(distance)
    spread = rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 3000, dtype=np.uint64)
    flips = [
        np.uint64(sum(1 << int(b) for b in rng.choice(64, size=k, replace=False))) for k in rng.integers(0, 12, 900)
    ]
    hashes = np.concatenate([spread, spread[:900] ^ np.array(flips, dtype=np.uint64)])
    first, second, searched = dedupe.near_pairs(hashes, distance)
    every = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= distance
    assert searched == len(hashes)
    assert sorted(zip(first.tolist(), second.tolist())) == [tuple(p) for p in np.argwhere(np.triu(every, 1)).tolist()]


def test_copies_of_one_picture_stay_one_group_and_a_chain_of_look_alikes_is_split():
    """Each image of the chain is alike to the next (correlation ~0.97), the ends are not: linked one to
    the next they would make one group of 60; the 40 copies are all alike to their first."""
    rng = np.random.default_rng(0)
    chain = [rng.normal(128, 40, 1024)]
    for _ in range(59):
        chain.append(chain[-1] + rng.normal(0, 10, 1024))
    copies = [chain[0][::-1] + rng.normal(0, 3, 1024) for _ in range(40)]
    thumbnails = [np.clip(t, 0, 255).astype(np.uint8).tobytes() for t in chain + copies]
    images = [
        Record(f"{i:03d}.jpg", "a", "x", 32, 32, 2**63 - 1, Path("x"), "", thumbnail, rank=f"{i:03d}")
        for i, thumbnail in enumerate(thumbnails)
    ]
    groups, unsearched = dedupe.near_duplicate_groups(images, 6)
    assert unsearched == 0
    assert [i.source for i in max(groups, key=len)] == [f"{i:03d}.jpg" for i in range(60, 100)]
    stars = [[int(i.source[:3]) for i in g] for g in groups if g[0].source < "060"]
    assert 1 < len(stars) < 60 and sum(len(star) for star in stars) == 60
    pixels = np.frombuffer(b"".join(thumbnails), np.uint8).reshape(100, -1)
    for first, *others in stars:  # every image alike to its star's first
        alike = dedupe.correlations(
            pixels, *dedupe.centred_norms(pixels), np.full(len(others), first), np.array(others, dtype=np.intp)
        )
        assert (alike >= dedupe.NEAR_CORRELATION).all()


def test_giant_near_duplicate_groups_stop_prepare_in_one_line(workdir):
    """What the fraction check says when groups of genuine near-copies leave no way to meet prepare.split."""
    paths = bad.write_pictures(RAW, {"a": 6, "b": 30})
    for i in range(24):  # a: 30 copies of one picture, slightly re-encoded each
        bad.near_copy(paths["a"][0], RAW / "a" / f"copy_{i:02d}.jpg", scale=(7 + i % 2) / 8, quality=70 + i)
    message = refused()
    assert message.startswith(
        "prepare.split (val 0.15, test 0.15) cannot be met within 1% in 1 of 2 classes, as each "
        "near-duplicate group (prepare.near_duplicate_distance=6) stays in one split: 'a' (val "
    )
    assert "its largest group holds 25 of its 30 images, the first " in message
    assert message.endswith(
        "remove the copies, or lower prepare.near_duplicate_distance (0: identical hashes only; "
        "null: no grouping, near-copies may then be in train and test)"
    )
    assert run_prepare(**{"prepare.near_duplicate_distance": None})["per_class"]["a"] == {
        "train": 22,
        "val": 4,
        "test": 4,
    }


def test_heavy_imbalance_warns_in_one_line(workdir, capsys):
    bad.write_pictures(RAW, {"big": 41, "small": 4})
    run_prepare()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: classes are heavily imbalanced: 'big' has 41 images, 'small' only 4"]


def test_stage_prints_one_line_for_a_user_mistake(workdir):
    bad.write_pictures(RAW, {"only": 5})
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.prepare"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: data/raw has 1 class folder(s) ['only']; need at least 2 (one sub-folder of images per class)"
    ]
