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
few). cleanlab's confident learning then flags the images whose given label the held-out
probabilities contradict, against per-class confidence thresholds.

Outputs:
- ``reports/label_issues.csv``: one row per flagged image, most likely mislabelled first:
  ``source`` (its file in ``data/raw``), ``split``, ``given`` (its label), ``suggested`` (the
  held-out model's most probable class) and ``score`` (the held-out probability of the given
  label, cleanlab's self-confidence: the lower, the likelier the label is wrong);
- ``reports/label_issues.png``: the top ``label_issues.gallery`` suspects, given → suggested.
The evaluate stage logs both to the pipeline's MLflow run.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
from cleanlab.filter import find_label_issues
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.cli import run_stage
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
# overconfident: the head itself gets that from early stopping on val_loss, this model from the C
# with the best held-out log loss. (Flowers, MobileNetV2 features: log loss 0.46 at C=1, 0.33 at
# 0.1, 0.28 at 0.01, 0.35 at 0.001; 213, 155, 98 and 56 images flagged.)
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


def held_out_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's class probabilities from the head's model trained on the other folds only
    (k capped at the smallest class, so that every class is in every fold), at the strength of
    regularization (``REGULARIZATION``) whose held-out probabilities have the lowest log loss."""
    splits = StratifiedKFold(n_splits=min(folds, np.bincount(labels).min()), shuffle=True, random_state=seed)
    # One BLAS thread: the same sums, so the same flags, on any number of cores; and faster, as
    # these matrices are too thin to share out (flowers: 11 s, 80 s with 2 threads on a busy 2-core machine).
    with threadpool_limits(1):
        candidates = [cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)),
                                        features, labels, cv=splits, method="predict_proba") for c in REGULARIZATION]
    return min(candidates, key=lambda probabilities: log_loss(labels, probabilities))


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
    probabilities = held_out_probabilities(features, labels, cfg.label_issues.folds, cfg.seed)
    issues = ranked_issues(labels, probabilities)

    # The augmented manifest's source is the prepared image; the prepared manifest's, the raw file.
    raw_file = {r.path: r.source for r in read_rows(PREPARED_MANIFEST, PreparedImage)}
    suspects = [(raw_file[rows[i].source], rows[i].split, classes[labels[i]],
                 classes[probabilities[i].argmax()], probabilities[i, labels[i]]) for i in issues]
    write_manifest(LABEL_ISSUES_REPORT, COLUMNS, [[*suspect[:-1], f"{suspect[-1]:.4f}"] for suspect in suspects])
    shown = issues[: cfg.label_issues.gallery]
    write_gallery([PREPARED_DIR / rows[i].source for i in shown],
                  [f"{plots.short(Path(source).name)}\n{plots.short(given)} → {plots.short(suggested)} ({score:.2f})"
                   for source, _, given, suggested, score in suspects[: len(shown)]])
    print(f"label_issues: {len(issues)} of {len(labels)} images flagged as likely mislabelled ({LABEL_ISSUES_REPORT})")


if __name__ == "__main__":
    run_stage(main)
