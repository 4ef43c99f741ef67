"""prepare on every source layout: split folders whose split is kept, class folders nested deeper
(data.class_depth), a labels table (data.labels, through the download stage), and many classes
too small for the split.

Like tests/test_prepare.py, the stages run in-process in a throw-away folder.
"""

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from test_prepare import PREPARED, RAW, manifest, quarantine, refused, run_prepare

import fixtures_bad as bad
from conftest import make_images, set_params
from pipeline.data.manifests import read_manifest
from pipeline.paths import LABELS_TABLE
from pipeline.stages import download


def splits_by_top_folder() -> dict[str, set[str]]:
    """The splits the manifest gives to the images of each top-level folder of data/raw."""
    found = defaultdict(set)
    for source, row in manifest().items():
        found[source.split("/")[0]].add(row["split"])
    return dict(found)


def ignored() -> dict[str, str]:
    return {row["source"]: row["reason"] for row in read_manifest(PREPARED / "ignored.csv")}


# --- Split folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("val", ["val", "valid", "Validation"])
def test_train_and_val_folders_are_kept_and_test_is_drawn_from_train(workdir, capsys, val):
    make_images(RAW / "train", {"cats": 10, "dogs": 10}, seed=1)
    make_images(RAW / val, {"cats": 3, "dogs": 3}, seed=2)
    report = run_prepare()
    assert json.loads((PREPARED / "labels.json").read_text()) == ["cats", "dogs"]  # not "train" and "val"
    assert splits_by_top_folder() == {"train": {"train", "test"}, val: {"val"}}
    assert report["per_class"] == {label: {"train": 8, "val": 3, "test": 2} for label in ("cats", "dogs")}
    assert (report["layout"], report["splits_given"]) == ("split_folders", ["train", "val"])
    assert (
        f"prepare: split folders train/, {val}/ (test drawn from train), label = top folder inside each: "
        "26 images in 2 classes (train 16, val 6, test 4)"
    ) in capsys.readouterr().out


def test_three_split_folders_are_kept_and_copies_across_them_reported(workdir, capsys):
    folders = ("TRAIN", "val", "Test")
    paths = {
        folder: bad.write_pictures(RAW / folder, {"cats": 6, "dogs": 6}, first_seed=100 * i)
        for i, folder in enumerate(folders)
    }
    shutil.copy(paths["TRAIN"]["cats"][0], RAW / "Test" / "cats" / "copy.jpg")  # leakage: the same picture
    bad.near_copy(paths["TRAIN"]["dogs"][0], RAW / "val" / "dogs" / "near.jpg")  # and a near-copy
    report = run_prepare()
    assert splits_by_top_folder() == {"TRAIN": {"train"}, "val": {"val"}, "Test": {"test"}}
    assert report["per_split"] == {"train": 12, "val": 13, "test": 13} and report["duplicates_dropped"] == 0
    rows = manifest()
    assert rows["Test/cats/copy.jpg"]["path"] == rows["TRAIN/cats/img_0000.jpg"]["path"]  # one file, two splits
    assert report["cross_split"] == {"groups": 2, "images": 4, "exact": 1}
    leaks = [row for row in read_manifest(PREPARED / "duplicates.csv") if row["kind"] == "cross_split"]
    assert {frozenset((row["source"], row["same_as"])) for row in leaks} == {
        frozenset(("TRAIN/cats/img_0000.jpg", "Test/cats/copy.jpg")),
        frozenset(("TRAIN/dogs/img_0006.jpg", "val/dogs/near.jpg")),
    }
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: 2 near-duplicate groups (4 images; exact copies: 1) span the splits the source "
        "gives; they stay where they are, so val and test scores may be optimistic (kind cross_split "
        "in data/prepared/duplicates.csv)"
    ]


def test_one_class_written_in_two_unicode_forms_across_split_folders_is_merged_with_a_warning(workdir, capsys):
    make_images(RAW / "train", {"caf\u00e9": 6, "tea": 6}, seed=1)  # composed é
    make_images(RAW / "val", {"cafe\u0301": 2, "tea": 2}, seed=2)  # decomposed, as macOS writes it
    report = run_prepare()  # not refused as "class 'café' is in val/ but not in train/"
    assert report["per_class"]["café"]["val"] == 2 and json.loads((PREPARED / "labels.json").read_text()) == [
        "café",
        "tea",
    ]
    assert (
        "merge names that differ only in their Unicode form (NFC/NFD, one name to Unicode and to macOS): 'café' "
        "from 'cafe\\u0301' and 'caf\\xe9'" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (
            {"train/cats": 4, "birds": 4, "dogs": 4},
            "data/raw mixes split folders (train) with other folders (birds, dogs): put every class folder inside the "
            "split folders (a class named like a split: rename it)",
        ),
        (
            {"train/cats": 4, "train/dogs": 4, "val/cats": 2, "val/birds": 2},
            "class 'birds' is in data/raw/val/ but not in data/raw/train/ (other gaps: 1): every split folder needs the "
            "same class folders; add it to train/ or remove it",
        ),
        (
            {"train/cats": 4, "val/cats": 2, "valid/cats": 2},
            "data/raw has 2 folders for the val split (val, valid): merge them into one",
        ),
        (
            {"val/cats": 4, "test/cats": 2},
            "data/raw has split folders (val, test) but no train folder: add train/ holding the class folders to train on",
        ),
    ],
    ids=["mixed", "class-missing", "two-val", "no-train"],
)
def test_inconsistent_split_folders_are_refused_in_one_line(workdir, tree, message):
    for i, (folder, count) in enumerate(tree.items()):
        make_images(RAW / Path(folder).parent, {Path(folder).name: count}, seed=i)
    assert refused() == message


# --- Nested class folders ---------------------------------------------------------------------


def test_class_depth_2_labels_by_two_folder_levels(workdir, capsys):
    make_images(RAW / "dogs", {"husky": 5, "pug": 5})
    make_images(RAW / "cats", {"siamese": 5}, seed=1)
    make_images(RAW, {"cats": 1}, seed=2)  # cats/cats_000.jpg: above the class folders
    report = run_prepare(**{"data.class_depth": 2})
    assert json.loads((PREPARED / "labels.json").read_text()) == ["cats/siamese", "dogs/husky", "dogs/pug"]
    husky = manifest()["dogs/husky/husky_000.jpg"]
    assert husky["label"] == "dogs/husky" and husky["path"].startswith("images/dogs__husky/")  # one folder
    assert (PREPARED / husky["path"]).is_file()
    assert ignored() == {
        "cats/cats_000.jpg": "outside the class folders: fewer than data.class_depth=2 folders above it"
    }
    assert report["images"] == 15
    assert (
        "prepare: class folders, label = top 2 folder levels (a/b): 15 images in 3 classes" in capsys.readouterr().out
    )
    report = run_prepare(**{"data.class_depth": 1})
    assert report["per_class"].keys() == {"cats", "dogs"} and report["images"] == 16
    assert "prepare: class folders, label = top folder: 16 images" in capsys.readouterr().out


# --- Labels table -----------------------------------------------------------------------------


def test_labels_table_labels_images_in_one_folder_and_quarantines_bad_rows(workdir, tmp_path, capsys):
    make_images(tmp_path / "generated", {"red": 13, "blue": 12})
    flat = tmp_path / "source" / "photos" / "all"  # download skips both wrapping folders
    flat.mkdir(parents=True)
    for path in (tmp_path / "generated").rglob("*.jpg"):
        path.rename(flat / path.name)  # one folder: the labels are only in the table
    rows = [
        f"{'photos/all/' if i % 2 else ''}{color}_{i:03d}.jpg,{color},{'Valid' if i < first + 3 else ''}"
        for color, first in (("red", 0), ("blue", 2))
        for i in range(first, first + 10)
    ]  # both path forms
    bad_rows = [
        "photos/all/missing.jpg,red,",
        "red_010.jpg,,",
        "blue_000.jpg,blue,dev",
        "blue_001.jpg,../up,",
        "red_000.jpg,blue,",
        "red_011.jpg,red",
        f"{flat / 'red_012.jpg'},red,",
    ]
    table = tmp_path / "labels.csv"
    table.write_text("\n".join(["Path,Label,Split", *rows, "", *bad_rows]) + "\n", encoding="utf-8")
    set_params(workdir, **{"data.url": str(tmp_path / "source"), "data.labels": str(table)})
    download.main()
    report = run_prepare()
    assert json.loads((PREPARED / "labels.json").read_text()) == ["blue", "red"]
    splits = {source: (row["label"], row["split"]) for source, row in manifest().items()}
    assert {source for source, (_, split) in splits.items() if split == "val"} == {
        "red_000.jpg",
        "red_001.jpg",
        "red_002.jpg",
        "blue_002.jpg",
        "blue_003.jpg",
        "blue_004.jpg",
    }
    assert report["per_class"] == {label: {"train": 6, "val": 3, "test": 1} for label in ("blue", "red")}
    assert (report["layout"], report["splits_given"]) == ("labels_csv", ["val"])
    assert quarantine() == {
        "photos/all/missing.jpg": "missing file: row 23 of data.labels names 'photos/all/missing.jpg', which is not a "
        "file in the source",
        "red_010.jpg": "empty label: row 24 of data.labels has no label",
        "blue_000.jpg": "unknown split: row 25 of data.labels has 'dev'; use train, val (valid, validation), test "
        "or nothing",
        "blue_001.jpg": "bad label: row 26 of data.labels has '../up', which has '.' or '..' parts, a leading '/' "
        "or control characters",
        "red_000.jpg": "listed twice: row 27 of data.labels names the file of row 2",
        "red_011.jpg": "malformed row: row 28 of data.labels has 2 fields, its header 3",
        str(flat / "red_012.jpg"): f"absolute path: row 29 of data.labels names '{flat / 'red_012.jpg'}'; absolute "
        "paths are not allowed: give the path relative to the source (e.g. daisy/1.jpg)",
    }
    assert splits["red_000.jpg"] == ("red", "val")  # the first row counts
    assert ignored() == {"red_012.jpg": "not listed in data.labels"}
    recorded = json.loads(Path("reports/download.json").read_text())["labels"]
    assert recorded["path"] == str(table) and recorded["rows"] == len(rows) + 1 + len(bad_rows)
    assert LABELS_TABLE.is_file()  # versioned with the images
    assert (
        "prepare: labels from data.labels, splits from its split column (test drawn from train): 20 images in "
        "2 classes (train 12, val 6, test 2); 7 quarantined"
    ) in capsys.readouterr().out


def test_labels_table_without_usable_rows_says_why(workdir, tmp_path):
    make_images(tmp_path / "source", {"red": 4, "blue": 4})
    table = tmp_path / "labels.csv"
    table.write_text("path,label\nimages/red_000.jpg,red\n", encoding="utf-8")
    set_params(workdir, **{"data.url": str(tmp_path / "source"), "data.labels": str(table)})
    download.main()
    assert refused() == (
        "data.labels names 0 class(es) [] on usable rows; need at least 2; 1 bad rows, the first: "
        "missing file: row 2 of data.labels names 'images/red_000.jpg', which is not a file in the "
        "source"
    )


# --- Too small classes ------------------------------------------------------------------------


def test_many_classes_too_small_fail_in_one_line_naming_ten(workdir):
    make_images(RAW, {f"c{i:03d}": 3 for i in range(100)}, size=(32, 32))
    message = refused()
    assert message.startswith(
        "too few usable images to put one in each of train, val and test in 100 of 100 classes (prepare.split val "
        "0.15, test 0.15; near-duplicates count as one; each class needs at least 4): 'c000' (train 3, val 0, test 0), "
    )
    assert message.endswith("'c009' (train 3, val 0, test 0) and 90 more: add images or remove those classes")
    assert message.count("(train 3, val 0, test 0)") == 10
