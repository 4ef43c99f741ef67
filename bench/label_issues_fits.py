"""The label_issues stage's k-fold fits: all images on one core (as before) vs one process per core
with each fold's model on a stratified sample of ``label_issues.max_fit_images``.

Generated features shaped like a backbone's pooled output (non-negative, ``--dim`` wide, 10
classes that overlap, so that the logistic regressions take as many iterations as on real
features), ``--images`` rows. Times ``label_issues.held_out_probabilities`` both ways, and says how
many of the images the unsampled fits flag the sampled ones flag too.

    python bench/label_issues_fits.py --images 70000 --dim 1280
"""

import argparse
import time
from pathlib import Path

import joblib
import numpy as np

from common import load_average, machine, report
from pipeline.stages.label_issues import held_out_probabilities, ranked_issues

CLASSES = 10


def features(images: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class centres a little apart in a few hundred of ``dim`` directions, ReLU of centre + noise,
    and 2 % of the labels moved to another class (something for confident learning to find)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, images)
    centres = rng.normal(0, 1, (CLASSES, dim)) * (rng.random(dim) < 0.3)
    rows = np.maximum(0.6 * centres[labels] + rng.normal(0, 1, (images, dim)), 0).astype("float32")
    flipped = rng.random(images) < 0.02
    labels[flipped] = (labels[flipped] + rng.integers(1, CLASSES, flipped.sum())) % CLASSES
    return rows, labels


def timed(rows: np.ndarray, labels: np.ndarray, max_fit_images: int, processes: int) -> tuple[float, set, str]:
    started = time.perf_counter()
    held_out = held_out_probabilities(
        rows, labels, folds=5, seed=42, max_fit_images=max_fit_images, processes=processes
    )
    seconds = time.perf_counter() - started
    return seconds, set(ranked_issues(labels, held_out.probabilities).tolist()), held_out.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=70000)
    parser.add_argument("--dim", type=int, default=1280, help="feature width (MobileNetV2: 1280)")
    parser.add_argument("--max-fit-images", type=int, default=20000, help="label_issues.max_fit_images")
    parser.add_argument("--append", type=Path, help="append the section to this file (bench/results.md)")
    args = parser.parse_args()
    started, info = time.perf_counter(), machine()
    rows, labels = features(args.images, args.dim)
    before, flagged_before, how_before = timed(rows, labels, args.images, processes=1)
    after, flagged_after, how_after = timed(rows, labels, args.max_fit_images, joblib.cpu_count())
    table = [
        ("before: every image, one core", f"{before:.0f} s ({how_before}); {len(flagged_before)} flagged"),
        ("after: sampled fits, every core", f"{after:.0f} s ({how_after}); {len(flagged_after)} flagged"),
        ("speed-up", f"{before / after:.1f}x"),
        ("flagged by both / by the unsampled fits", f"{len(flagged_before & flagged_after)} / {len(flagged_before)}"),
        ("load average (1 min) after", load_average()),
    ]
    command = (
        f"python bench/label_issues_fits.py --images {args.images} --dim {args.dim} "
        f"--max-fit-images {args.max_fit_images}"
    )
    report(
        f"label_issues fits: {args.images:,} images x {args.dim} features, {info['cores']} cores",
        table,
        command,
        started,
        info,
        args.append,
    )


if __name__ == "__main__":
    main()
