"""The label_issues stage: generated features in well-separated clusters, some labels flipped on
purpose; confident learning must flag exactly the flipped images and rank them first.

The flipped images are the most typical of their true class (nearest its centre), like a plain
daisy filed under roses: a random member of a class gets only an average held-out confidence in
its true class, and confident learning counts an image as another class's only when that is above
the class's average (its per-class threshold), so a random flip is missed about half the time."""

import csv
import json

import joblib
import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import set_params
from pipeline.cli import UserError
from pipeline.config import load_config
from pipeline.data.manifests import write_manifest
from pipeline.model import feature_store
from pipeline.stages import label_issues

CLASSES = ["daisy", "roses", "tulips"]


def clustered(per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features around one centre per class, 10 standard deviations apart."""
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    centres = 10 * np.eye(len(CLASSES))
    return (centres[labels] + rng.normal(0, 1, (len(labels), len(CLASSES)))).astype("float32"), labels


def most_typical(features: np.ndarray, labels: np.ndarray, of_class: int, count: int) -> np.ndarray:
    """The ``count`` members of ``of_class`` nearest its centre."""
    members = np.flatnonzero(labels == of_class)
    distance = np.linalg.norm(features[members] - 10 * np.eye(len(CLASSES))[of_class], axis=1)
    return members[np.argsort(distance)[:count]]


def flip(labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    noisy = labels.copy()
    noisy[indices] = (labels[indices] + 1) % len(CLASSES)
    return noisy


def test_flipped_labels_are_flagged_and_ranked_first():
    rng = np.random.default_rng(0)
    features, labels = clustered(40, rng)
    flipped = np.concatenate([most_typical(features, labels, c, 2) for c in range(len(CLASSES))])
    noisy = flip(labels, flipped)
    probabilities = label_issues.held_out_probabilities(
        features, noisy, folds=5, seed=0, max_fit_images=1000
    ).probabilities
    issues = label_issues.ranked_issues(noisy, probabilities)
    assert sorted(issues) == sorted(flipped)
    scores = probabilities[issues, noisy[issues]]
    assert list(scores) == sorted(scores) and scores.max() < 0.1  # the given label is the unlikely one
    assert list(probabilities[issues].argmax(axis=1)) == list(labels[issues])  # suggested = the true class


def test_folds_are_capped_by_the_smallest_class():
    rng = np.random.default_rng(1)
    features, labels = clustered(20, rng)
    keep = np.r_[0:20, 20:23, 40:60]  # the second class has 3 images: at most 3 folds
    held_out = label_issues.held_out_probabilities(features[keep], labels[keep], folds=10, seed=0, max_fit_images=1000)
    probabilities = held_out.probabilities
    assert held_out.folds == 3 and held_out.fits == 3 * len(label_issues.REGULARIZATION)
    assert probabilities.shape == (43, 3) and np.allclose(probabilities.sum(axis=1), 1)


def test_past_max_fit_images_each_fold_trains_on_a_stratified_sample_and_every_image_is_scored():
    rng = np.random.default_rng(4)
    features, labels = clustered(300, rng)
    flipped = np.concatenate([most_typical(features, labels, c, 3) for c in range(len(CLASSES))])
    noisy = flip(labels, flipped)
    held_out = label_issues.held_out_probabilities(features, noisy, folds=4, seed=0, max_fit_images=120)
    assert (held_out.fold_images, held_out.fit_images) == (675, 120)  # 3/4 of 900 images; 40 per class
    assert held_out.probabilities.shape == (900, 3)
    assert sorted(label_issues.ranked_issues(noisy, held_out.probabilities)) == sorted(flipped)
    assert "on stratified samples of 120 of 675 images (label_issues.max_fit_images)" in held_out.summary()


def test_stratified_sample_keeps_every_class_in_proportion():
    labels = np.repeat([0, 1, 2], [900, 95, 5])
    sample = label_issues.stratified_sample(np.arange(1000), labels, 100, seed=0)
    assert list(np.bincount(labels[sample])) == [90, 10, 1]  # rounded up: the rarest class stays
    assert list(sample) == sorted(set(sample))
    assert list(label_issues.stratified_sample(np.arange(50), labels[:50], 100, seed=0)) == list(range(50))


def loky_workers() -> set[int]:
    """The joblib (loky) worker processes this process has started and keeps for reuse."""
    return {p.pid for p in psutil.Process().children(recursive=True) if "loky" in " ".join(p.cmdline())}


def test_the_fits_run_in_one_process_per_core_with_the_same_result():
    rng = np.random.default_rng(5)
    features, labels = clustered(60, rng)
    noisy = flip(labels, most_typical(features, labels, 0, 2))
    alone = label_issues.held_out_probabilities(features, noisy, folds=5, seed=0, max_fit_images=100, processes=1)
    parallel = label_issues.held_out_probabilities(features, noisy, folds=5, seed=0, max_fit_images=100, processes=2)
    assert (alone.processes, parallel.processes) == (1, 2) and parallel.summary().endswith(", 2 processes")
    assert len(loky_workers()) >= 2  # the fits ran in worker processes, not threads of this one
    np.testing.assert_array_equal(alone.probabilities, parallel.probabilities)


def write_stage_inputs(root, per_split: dict[str, int], copies: int, rng) -> dict[str, tuple[str, str, str]]:
    """data/prepared, data/augmented/manifest.csv and data/features as the earlier stages write them,
    with tiny images. Augmented copies get features of the wrong class on purpose: the stage must
    score originals only. Returns, per flipped image's raw source, its (split, given, true label)."""
    prepared, augmented, flipped = [], [], {}
    features_dir = root / "data" / "features"
    features_dir.mkdir(parents=True)
    for of_class, (split, per_class) in enumerate(per_split.items()):
        features, labels = clustered(per_class, rng)
        noisy = flip(labels, most_typical(features, labels, of_class, 1))  # train: a daisy labelled roses, ...
        rows, labels_out = [], []
        for i, (label, true) in enumerate(zip(noisy, labels, strict=True)):
            name = CLASSES[label]
            path = f"images/{name}/{split}{i:03d}.jpg"
            (root / "data" / "prepared" / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 32), (40 * label, 80, 120)).save(root / "data" / "prepared" / path)
            prepared.append([path, name, split, f"{i:064x}", 40, 32, f"{name}/{split}_photo{i}.jpg"])
            if label != true:
                flipped[f"{name}/{split}_photo{i}.jpg"] = (split, name, CLASSES[true])
            for copy in range(copies + 1 if split == "train" else 1):
                augmented.append([f"{split}/{name}/{split}{i:03d}_{copy}.jpg", name, split, copy, path])
                rows.append(features[i] if copy == 0 else features[(i + per_class) % len(labels)])
                labels_out.append(label)
        stored = feature_store.new_features(features_dir, split, len(rows), features.shape[1])
        stored[:] = np.stack(rows)
        stored.flush()
        feature_store.write_labels(features_dir, split, labels_out)
    write_manifest(
        root / "data" / "prepared" / "manifest.csv",
        ["path", "label", "split", "sha256", "width", "height", "source"],
        prepared,
    )
    write_manifest(
        root / "data" / "augmented" / "manifest.csv", ["path", "label", "split", "copy", "source"], augmented
    )
    (features_dir / feature_store.LABELS).write_text(json.dumps(CLASSES))
    feature_store.write_meta(
        features_dir,
        feature_store.Meta(
            backbone="generated",
            weights="none",
            image_size=0,
            precision="float32",
            dim=features.shape[1],
            activation_cut=None,
            activation_dtype=None,
            images=len(augmented),
            seconds=0.0,
        ),
    )
    return flipped


def test_stage_reports_the_flipped_originals_of_every_split(workdir, capsys):
    flipped = write_stage_inputs(workdir, {"train": 30, "val": 8, "test": 8}, copies=2, rng=np.random.default_rng(2))
    set_params(workdir, **{"label_issues.gallery": 2})
    label_issues.main()
    with open(workdir / "reports" / "label_issues.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["source"]: (r["split"], r["given"], r["suggested"]) for r in rows} == flipped
    assert {r["split"] for r in rows} == {"train", "val", "test"}  # test mislabels are found too
    assert [float(r["score"]) for r in rows] == sorted(float(r["score"]) for r in rows)
    processes = min(joblib.cpu_count(), 5 * len(label_issues.REGULARIZATION))
    assert capsys.readouterr().out.strip().splitlines()[-1] == (  # 3 x 46 images; 4/5 of them train each fold
        "label_issues: 3 of 138 images flagged as likely mislabelled (reports/label_issues.csv); "
        f"20 fits (5 folds x 4 C) on 111 images, {processes} process{'es' if processes > 1 else ''}"
    )
    with Image.open(workdir / "reports" / "label_issues.png") as gallery:
        assert gallery.format == "PNG" and gallery.width > 200
    assert sorted(p.name for p in (workdir / "reports").iterdir()) == ["label_issues.csv", "label_issues.png"]


def test_features_that_do_not_match_the_manifest_stop_with_one_line(workdir):
    write_stage_inputs(workdir, {"train": 6, "val": 3, "test": 3}, copies=1, rng=np.random.default_rng(3))
    feature_store.write_labels(workdir / "data" / "features", "val", [0, 0])
    with pytest.raises(UserError, match=r"^data/features does not match data/augmented \(2 vs 9 val images\)"):
        label_issues.main()


def test_fewer_than_two_folds_are_refused(workdir):
    set_params(workdir, **{"label_issues.folds": 1})
    expected = r"^params.yaml(:\d+)?: label_issues.folds: Input should be greater than or equal to 2 \(got 1\)$"
    with pytest.raises(UserError, match=expected):
        load_config()
