"""Head quality on features of real weights: the train stage's head vs logistic regression vs nearest
centroid, over several draws of the split (issue 23).

Features: the pipeline's own stages (download, prepare, augment without copies, features) run once
per source in a scratch project, with ``--weights`` (a MobileNetV2 no-top file): the flowers
archive (``--archive``) at 224 px, and ``GENERATED_CLASSES`` classes of generated images
(:func:`generated_images`) at 160 px. Each row then draws its splits from those features, once per
split seed (``--split-seeds``):

- N per class (like ``data.max_per_class: N``): per class, a seeded shuffle; the first N images
  split as the prepare stage splits them (val and test round(0.15 N) each, train the rest), and
  every image of the class beyond the first N joins the test split, so that small rows are scored
  on hundreds of images, not on round(0.15 N) per class;
- the whole archive: 15 % val, 15 % test per class, the rest train.

Contenders, on the same rows (the features of the original images: no augmented copies):

- the head: ``train.linear_head_model``, as the train stage fits it with params.yaml's settings,
  once per training seed (``--train-seeds``);
- the Keras head as the train stage trained it before issue 23 (Adam, plateau schedule, early
  stopping, label smoothing, dropout, temperature scaling: ``head_settings.one_run``), once per
  training seed: what the seed lottery was;
- logistic regression as a user writes it: StandardScaler + LogisticRegression, C in ``USER_C``
  chosen by val log loss;
- nearest centroid on standardized features.

Per row and contender: the mean test accuracy over the split seeds, its standard error (standard
deviation / sqrt(seeds)) and range; for the heads, the spread over training seeds (the largest
max - min within one split); and the head's paired difference to logistic regression.

    python bench/head_quality.py --archive flower_photos.tgz --weights mobilenet_v2_1.0_224_imagenet_no_top.h5 \
        --append bench/results.md
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import head_settings
import keras
import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from common import REPO, add_project_arguments, machine, new_workdir, report, run_stage
from pipeline.config import Config, load_config, override_params
from pipeline.data.manifests import read_labels
from pipeline.model import feature_store, networks
from pipeline.stages import train

USER_C = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # the logistic regression's grid (issue 23's competitor)
FLOWERS_PER_CLASS = (10, 20, 50, 100, None)  # None = the whole archive
TWO_CLASSES = ("roses", "tulips")  # the flowers' most confused pair
TWO_CLASS_PER_CLASS = 30
GENERATED_CLASSES, GENERATED_IMAGES, GENERATED_PER_CLASS = 100, 30, 20  # classes, images of each, N of the row
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Features:
    """Every image of a source: its features and class index, and the class names."""

    rows: np.ndarray
    labels: np.ndarray
    classes: list[str]


@dataclass(frozen=True)
class Row:
    name: str
    features: Features
    per_class: int | None  # None: the whole source, 70/15/15
    classes: tuple[str, ...] | None = None  # None: every class


def generated_images(root: Path, classes: int, per_class: int, size: int = 96, seed: int = 0) -> Path:
    """``per_class`` JPEGs of each of ``classes`` classes: a class is two sine gratings (frequencies,
    angles) blended between two colours; each image jitters them (+-35 %), draws new phases, scales
    its brightness and adds noise. Logistic regression on MobileNetV2 features gets about 0.7."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    for index in range(classes):
        frequencies, angles, colours = rng.uniform(1.5, 6, 2), rng.uniform(0, np.pi, 2), rng.uniform(0, 255, (2, 3))
        folder = root / f"class_{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            f, a, phase = (
                frequencies * rng.uniform(0.65, 1.35, 2),
                angles + rng.normal(0, 0.35, 2),
                rng.uniform(0, 7, 2),
            )
            wave = sum(np.sin(2 * np.pi * f[k] * (x * np.cos(a[k]) + y * np.sin(a[k])) + phase[k]) for k in range(2))
            mix = ((wave - wave.min()) / (np.ptp(wave) + 1e-9))[..., None]
            pixels = (colours[0] * mix + colours[1] * (1 - mix)) * rng.uniform(0.7, 1.3)
            pixels += rng.normal(0, 60, pixels.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def extracted(workdir: Path, source: Path, weights: Path, image_size: int) -> tuple[Features, float | None]:
    """Features of every image of ``source`` by the pipeline's stages, and the seconds they took;
    those a previous run left in ``workdir`` (seconds None)."""
    folder = workdir / "data" / "features"
    seconds = None
    if not (folder / feature_store.META).is_file():
        new_workdir(workdir, source, per_class=None, image_size=image_size, copies=0, epochs=10)
        override_params(
            workdir / "params.yaml",
            {
                "model.backbone": "mobilenet_v2",
                "model.weights": str(weights.resolve()),
                "prepare.near_duplicate_distance": 0,
            },
        )
        seconds = sum(run_stage(stage, workdir).seconds for stage in ("download", "prepare", "augment", "features"))
    return Features(
        np.concatenate([feature_store.features(split, folder) for split in SPLITS]),
        np.concatenate([feature_store.labels(split, folder) for split in SPLITS]),
        read_labels(folder / feature_store.LABELS),
    ), seconds


def draw(labels: np.ndarray, per_class: int | None, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Row indices of each split (see the module's docstring); classes in ``labels`` order."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = len(members) if per_class is None else per_class
        held = round(n * fraction)
        parts["val"].append(members[:held])
        parts["test"] += [members[held : 2 * held], members[n:]]
        parts["train"].append(members[2 * held : n])
    return {split: np.concatenate(indices) for split, indices in parts.items()}


def split_data(row: Row, fraction: float, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features and class indices (0..k-1 over the row's classes) of each split of one draw."""
    features = row.features
    kept = np.arange(len(features.labels))
    if row.classes:
        wanted = [features.classes.index(name) for name in row.classes]
        kept = kept[np.isin(features.labels, wanted)]
    labels = np.unique(features.labels[kept], return_inverse=True)[1]
    indices = draw(labels, row.per_class, fraction, seed)
    return (
        {split: features.rows[kept[i]] for split, i in indices.items()},
        {split: labels[i] for split, i in indices.items()},
    )


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predicted == labels))


def our_head(cfg: Config, x: dict, y: dict, seed: int) -> float:
    keras.utils.set_random_seed(seed)  # as the train stage does; the solve takes none
    n_classes = int(y["train"].max()) + 1
    head, _ = train.linear_head_model(
        cfg, networks.standardization(x["train"]), (x["train"], y["train"]), (x["val"], y["val"]), n_classes
    )
    return accuracy(head.predict(x["test"], verbose=0).argmax(axis=1), y["test"])


def keras_head(cfg: Config, x: dict, y: dict, seed: int) -> float:
    return head_settings.one_run(cfg, x, y, seed)["accuracy"]


def user_logistic_regression(x: dict, y: dict) -> float:
    fits = [
        make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x["train"], y["train"])
        for c in USER_C
    ]
    best = min(fits, key=lambda fit: log_loss(y["val"], fit.predict_proba(x["val"]), labels=fit.classes_))
    return accuracy(best.predict(x["test"]), y["test"])


def nearest_centroid(x: dict, y: dict) -> float:
    return accuracy(
        make_pipeline(StandardScaler(), NearestCentroid()).fit(x["train"], y["train"]).predict(x["test"]), y["test"]
    )


def measure(row: Row, cfg: Config, split_seeds: list[int], train_seeds: list[int]) -> dict[str, list[list[float]]]:
    """Per contender, per split seed, the test accuracy of each training seed (one for the
    deterministic contenders)."""
    contenders: dict[str, Callable[[dict, dict, int], float]] = {
        "head": lambda x, y, seed: our_head(cfg, x, y, seed),
        "keras head (before)": lambda x, y, seed: keras_head(cfg, x, y, seed),
        "logistic regression": lambda x, y, seed: user_logistic_regression(x, y),
        "nearest centroid": lambda x, y, seed: nearest_centroid(x, y),
    }
    seeded = ("head", "keras head (before)")
    results: dict[str, list[list[float]]] = {name: [] for name in contenders}
    seconds = dict.fromkeys(contenders, 0.0)
    for split_seed in split_seeds:
        x, y = split_data(row, cfg.prepare.split.val, split_seed)
        for name, contender in contenders.items():
            started = time.perf_counter()
            results[name].append([contender(x, y, seed) for seed in (train_seeds if name in seeded else [0])])
            seconds[name] += time.perf_counter() - started
    print(
        row.name,
        {name: [round(statistics.mean(r), 3) for r in runs] for name, runs in results.items()},
        {name: round(s) for name, s in seconds.items()},
        flush=True,
    )
    return results


def mean_and_error(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def table_row(row: Row, sizes: str, results: dict[str, list[list[float]]]) -> tuple[str, ...]:
    """Mean +- standard error (range) per contender over the split seeds (each split's mean over
    training seeds); the heads' spread over training seeds; the paired head - regression gap; the goals."""
    cells, means = [], {}
    for name, runs in results.items():
        per_split = [statistics.mean(r) for r in runs]
        mean, error = mean_and_error(per_split)
        means[name] = (mean, error)
        cells.append(f"{mean:.3f} ± {error:.3f} ({min(per_split):.3f}..{max(per_split):.3f})")
    spreads = {name: max(max(r) - min(r) for r in results[name]) for name in ("head", "keras head (before)")}
    gap, gap_error = mean_and_error(
        [
            statistics.mean(h) - statistics.mean(r)
            for h, r in zip(results["head"], results["logistic regression"], strict=True)
        ]
    )
    ahead = means["head"][0] >= means["logistic regression"][0] - means["logistic regression"][1]
    return (
        row.name,
        sizes,
        *cells,
        f"{spreads['head']:.3f}",
        f"{spreads['keras head (before)']:.3f}",
        f"{gap:+.3f} ± {gap_error:.3f}",
        "met" if ahead and spreads["head"] <= 0.01 else "NOT met",
    )


def rows_of(flowers: Features, generated: Features) -> list[Row]:
    rows = [Row(f"flowers, {n} per class" if n else "flowers, whole archive", flowers, n) for n in FLOWERS_PER_CLASS]
    rows.append(
        Row(
            f"flowers, two classes ({', '.join(TWO_CLASSES)}), {TWO_CLASS_PER_CLASS} per class",
            flowers,
            TWO_CLASS_PER_CLASS,
            TWO_CLASSES,
        )
    )
    rows.append(
        Row(f"generated, {GENERATED_CLASSES} classes, {GENERATED_PER_CLASS} per class", generated, GENERATED_PER_CLASS)
    )
    return rows


def split_sizes(row: Row, cfg: Config, seed: int) -> str:
    labels = split_data(row, cfg.prepare.split.val, seed)[1]
    return " / ".join(str(len(labels[split])) for split in SPLITS)


def took(seconds: float | None) -> str:
    return "a previous run (reused from --workdir)" if seconds is None else f"{seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="the flowers archive (.tgz)")
    parser.add_argument("--weights", type=Path, required=True, help="MobileNetV2 1.0 ImageNet weights, no top (.h5)")
    parser.add_argument("--split-seeds", type=int, default=5, help="draws of the split per row (seeds 0..n-1)")
    parser.add_argument(
        "--train-seeds",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[42, 1],
        help="training seeds of the two heads, per draw (comma-separated)",
    )
    add_project_arguments(parser)
    args = parser.parse_args()
    started, info = time.perf_counter(), machine()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="head-quality-"))).resolve()
    flowers, flowers_seconds = extracted(workdir / "flowers", args.archive, args.weights, 224)
    images = workdir / "generated-images"
    if not images.is_dir():
        generated_images(images, GENERATED_CLASSES, GENERATED_IMAGES)
    generated, generated_seconds = extracted(workdir / "generated", images, args.weights, 160)

    cfg = load_config(REPO / "params.yaml")
    split_seeds = list(range(args.split_seeds))
    header = (
        "data",
        "train / val / test images",
        "head",
        "keras head (before)",
        "logistic regression",
        "nearest centroid",
        "head: spread over training seeds",
        "keras head: spread over training seeds",
        "head - logistic regression (paired)",
        "goal: head >= regression - 1 SE, spread <= 0.01",
    )
    rows = []
    # One BLAS thread for every contender: on 2 busy cores, two threads made scikit-learn's solves
    # several times slower (pipeline.model.linear_head does the same).
    with threadpool_limits(1):
        for row in rows_of(flowers, generated):
            rows.append(
                table_row(row, split_sizes(row, cfg, split_seeds[0]), measure(row, cfg, split_seeds, args.train_seeds))
            )
    note = (
        f" Features (MobileNetV2, {args.weights.name}; original images, no augmented copies) by the pipeline's "
        f"stages: flowers {len(flowers.labels)} images at 224 px in {took(flowers_seconds)}, generated "
        f"{len(generated.labels)} images at 160 px in {took(generated_seconds)}. Test accuracy, mean ± standard "
        f"error over {len(split_seeds)} draws of the split (range); heads once per training seed "
        f"({', '.join(map(str, args.train_seeds))}) on each draw; spread = the largest max - min over the training "
        "seeds within one draw. Rows of N per class: N images per class split as prepare splits them, the "
        "class's other images added to test. Logistic regression: StandardScaler + LogisticRegression, "
        f"C in {USER_C} by val log loss. The Keras head: the train stage's head phase before issue 23 "
        "(bench/head_settings.py's one_run) at params.yaml's settings."
    )
    command = (
        f"python bench/head_quality.py --archive {args.archive} --weights {args.weights} --split-seeds "
        f"{args.split_seeds} --train-seeds {','.join(map(str, args.train_seeds))}"
    )
    report(
        "Head quality: the head vs logistic regression vs nearest centroid (issue 23)",
        rows,
        command,
        started,
        info,
        args.append,
        note,
        header,
    )


if __name__ == "__main__":
    main()
