"""Stage label_issues: rank the images whose label is most likely wrong (confident learning).

Inputs: ``data/features`` (the features stage's backbone features: ``<split>.npy`` rows follow the
rows of that split in ``data/augmented/manifest.csv``), that manifest, and ``data/prepared``
(``manifest.csv`` maps each prepared image to its file in ``data/raw``; the images are drawn).

Every original image (copy 0; augmented copies would only repeat it) of every split is scored,
test and val included, so a mislabelled test photo is found too. Each image gets class
probabilities from a model that never saw it: k-fold (``label_issues.folds``, at most the smallest
class's image count), each fold predicted by the head's model trained on the others; standardize
then a multinomial logistic regression is the softmax head (``model.head.dense_units: 0``), and it
trains in seconds on cached features (L2 strength: the one with the best held-out log loss of a
few). The folds x strengths fits run in parallel, one process per core, one BLAS thread each (the
same result on any machine); past ``label_issues.max_fit_images`` each fold's model trains on a
stratified sample of the other folds, so the fits cost the same at 100,000 images as at 20,000
(scoring every image stays linear), and the summary line says so. cleanlab's confident learning then flags the images whose given label the held-out
probabilities contradict, against per-class confidence thresholds.

Outputs:
- ``reports/label_issues.csv``: one row per flagged image, most likely mislabelled first:
  ``source`` (its file in ``data/raw``), ``split``, ``given`` (its label), ``suggested`` (the
  held-out model's most probable class) and ``score`` (the held-out probability of the given
  label, cleanlab's self-confidence: the lower, the likelier the label is wrong);
- ``reports/label_issues.png``: the top ``label_issues.gallery`` suspects, given → suggested.
The evaluate stage logs both to the pipeline's MLflow run.
"""

import itertools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from cleanlab.filter import find_label_issues
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.cli import progress, run_stage
from pipeline.config import load_config
from pipeline.data.manifests import AugmentedImage, PreparedImage, read_labels, read_rows, write_manifest
from pipeline.model import feature_store
from pipeline.paths import (
    FEATURES_DIR,
    LABEL_ISSUES_GALLERY,
    LABEL_ISSUES_REPORT,
    PREPARED_DIR,
    PREPARED_MANIFEST,
    SPLITS,
)
from pipeline.report import plots

COLUMNS = ["source", "split", "given", "suggested", "score"]
# Logistic regression's C values tried. Confident learning needs probabilities that are not
# overconfident: the head itself gets that from the L2 strength with the best val log loss
# (pipeline.model.linear_head), this model from the C with the best held-out log loss. (Flowers,
# MobileNetV2 features: log loss 0.46 at C=1, 0.33 at 0.1, 0.28 at 0.01, 0.35 at 0.001; 213, 155,
# 98 and 56 images flagged.)
REGULARIZATION = (1.0, 0.1, 0.01, 0.001)
GALLERY_HEADING = "Likely mislabelled: given label → suggested (held-out probability of the given label)"


def original_images() -> tuple[np.ndarray, np.ndarray, list[AugmentedImage]]:
    """Features, class indices and augmented-manifest rows of every split's original images (copy 0)."""
    features, labels, rows = [], [], []
    for split in SPLITS:
        split_rows, split_labels = feature_store.manifest_rows(split), feature_store.labels(split)
        originals = np.array([r.copy == 0 for r in split_rows])
        features.append(feature_store.features(split)[originals])  # reads those rows only
        labels.append(split_labels[originals])
        rows += [r for r, original in zip(split_rows, originals, strict=True) if original]
    return np.concatenate(features), np.concatenate(labels), rows


@dataclass(frozen=True)
class HeldOut:
    """Each image's held-out class probabilities, and how they were computed (for the summary line)."""

    probabilities: np.ndarray
    folds: int
    fold_images: int  # images the largest fold's model could train on (the other folds')
    fit_images: int  # images it trained on: fold_images, or a stratified sample of max_fit_images
    fits: int  # folds x REGULARIZATION
    processes: int

    def summary(self) -> str:
        sample = (
            f"stratified samples of {self.fit_images} of {self.fold_images} images (label_issues.max_fit_images)"
            if self.fit_images < self.fold_images
            else f"{self.fit_images} images"
        )
        processes = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        return f"{self.fits} fits ({self.folds} folds x {len(REGULARIZATION)} C) on {sample}, {processes}"


def stratified_sample(indices: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """``indices`` when at most ``limit``; else about ``limit`` of them (sorted), each class in its
    proportion, rounded up so that every class keeps at least one image."""
    if len(indices) <= limit:
        return indices
    shuffled = np.random.default_rng(seed).permutation(indices)
    keep = np.zeros(len(shuffled), dtype=bool)
    for members in (np.flatnonzero(labels[shuffled] == c) for c in np.unique(labels[shuffled])):
        keep[members[: math.ceil(len(members) * limit / len(shuffled))]] = True
    return np.sort(shuffled[keep])


def fit_and_predict(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, c: float
) -> np.ndarray:
    """The head's model at strength ``c`` trained on the ``train`` rows: its probabilities for the ``test`` rows."""
    # One BLAS thread: the same sums, so the same flags, on any number of cores; and faster, as
    # these matrices are too thin to share out (flowers: 11 s, 80 s with 2 threads on a busy 2-core machine).
    with threadpool_limits(1):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
        return model.fit(features[train], labels[train]).predict_proba(features[test])


def held_out_probabilities(
    features: np.ndarray, labels: np.ndarray, folds: int, seed: int, max_fit_images: int, processes: int | None = None
) -> HeldOut:
    """Each image's class probabilities from the head's model trained on the other folds only
    (k capped at the smallest class, so that every class is in every fold; each fold's model on a
    stratified sample of at most ``max_fit_images`` of their images, so that a fit costs the same
    at any dataset size), at the strength of regularization (``REGULARIZATION``) whose held-out
    probabilities have the lowest log loss. The fits run in ``processes`` worker processes (all
    cores by default: processes, as lbfgs holds the GIL between BLAS calls); the result is the
    same for any number."""
    k = min(folds, np.bincount(labels).min())
    splits = [
        (stratified_sample(train, labels, max_fit_images, seed + fold), test)
        for fold, (train, test) in enumerate(
            StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(features, labels)
        )
    ]
    jobs = list(itertools.product(range(len(REGULARIZATION)), splits))
    processes = min(processes or joblib.cpu_count(), len(jobs))
    with joblib.parallel_config(backend="loky", n_jobs=processes):
        fitted = joblib.Parallel(return_as="generator")(
            joblib.delayed(fit_and_predict)(features, labels, train, test, REGULARIZATION[c])
            for c, (train, test) in jobs
        )
        predictions = list(progress(fitted, len(jobs), "label_issues", "fit"))
    # In the predictions' dtype (float32 features: float32), which log_loss's check of the sums goes by.
    candidates = np.empty((len(REGULARIZATION), len(labels), predictions[0].shape[1]), predictions[0].dtype)
    for (c, (_, test)), predicted in zip(jobs, predictions, strict=True):
        candidates[c, test] = predicted
    return HeldOut(
        min(candidates, key=lambda probabilities: log_loss(labels, probabilities)),
        k,
        fold_images=max(len(labels) - len(test) for _, test in splits),
        fit_images=max(len(train) for train, _ in splits),
        fits=len(jobs),
        processes=processes,
    )


def ranked_issues(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Indices of the images confident learning flags, the lowest probability of the given label first."""
    # n_jobs=1: a few thousand rows take milliseconds; worker processes would only cost start-up time.
    return find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)


def write_gallery(paths: list[Path], titles: list[str]) -> None:
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    # plots write straight to their path: draw into a temporary folder beside the report, then
    # rename, so a failed run never leaves half a PNG.
    with tempfile.TemporaryDirectory(prefix=".label_issues-", dir=LABEL_ISSUES_GALLERY.parent) as tmp:
        plots.image_grid(images, titles, Path(tmp) / LABEL_ISSUES_GALLERY.name, heading=GALLERY_HEADING)
        os.replace(Path(tmp) / LABEL_ISSUES_GALLERY.name, LABEL_ISSUES_GALLERY)


def main() -> None:
    cfg = load_config()
    feature_store.read_meta()  # stops in one line when the features stage has not run
    classes = read_labels(FEATURES_DIR / feature_store.LABELS)
    features, labels, rows = original_images()
    held_out = held_out_probabilities(
        features, labels, cfg.label_issues.folds, cfg.seed, cfg.label_issues.max_fit_images
    )
    probabilities = held_out.probabilities
    issues = ranked_issues(labels, probabilities)

    # The augmented manifest's source is the prepared image; the prepared manifest's, the raw file.
    raw_file = {r.path: r.source for r in read_rows(PREPARED_MANIFEST, PreparedImage)}
    suspects = [
        (
            raw_file[rows[i].source],
            rows[i].split,
            classes[labels[i]],
            classes[probabilities[i].argmax()],
            probabilities[i, labels[i]],
        )
        for i in issues
    ]
    write_manifest(LABEL_ISSUES_REPORT, COLUMNS, [[*suspect[:-1], f"{suspect[-1]:.4f}"] for suspect in suspects])
    shown = issues[: cfg.label_issues.gallery]
    write_gallery(
        [PREPARED_DIR / rows[i].source for i in shown],
        [
            f"{plots.short(Path(source).name)}\n{plots.short(given)} → {plots.short(suggested)} ({score:.2f})"
            for source, _, given, suggested, score in suspects[: len(shown)]
        ],
    )
    print(
        f"label_issues: {len(issues)} of {len(labels)} images flagged as likely mislabelled ({LABEL_ISSUES_REPORT}); "
        f"{held_out.summary()}"
    )


if __name__ == "__main__":
    run_stage(main)
