"""Head phase vs the keras.io transfer-learning recipe, same split, backbone, weights, size, epochs, batch.

Ours: ``python -m pipeline.stages.augment``, ``pipeline.stages.features``, ``pipeline.stages.train`` (head phase only)
as subprocesses in a scratch project; their total wall time is the honest cost (offline augmentation
and feature extraction included, each with its own Python + TensorFlow start-up).
The recipe: ``recipe.py`` (the keras.io one, on our prepared split, in float32 as written), run as
a subprocess like our stages: its wall time includes its Python + TensorFlow start-up too (its time
from dataset creation to the end of ``fit`` is shown apart).
Ours computes at ``model.precision: auto`` (bfloat16 on CPUs with AMX / AVX512-BF16); the features
stage is also timed at float32 to show what that precision is worth.
Both run exactly ``--epochs`` epochs (our early stopping off) and report their last epoch's
val_accuracy on the same val images. Optionally times fine-tuning epochs of the top 2 blocks with
and without the activation cache (``train.fine_tune.cache_activations``).

    python bench/head_vs_tutorial.py --archive flower_photos.tgz --per-class 60 --image-size 150 --epochs 10
"""

import argparse
import csv
import shutil
import statistics
import tempfile
from pathlib import Path

import recipe
from common import add_slice_arguments, load_average, manifest_rows, new_workdir, run_stage
from pipeline.config import override_params
from pipeline.model import feature_store
from pipeline.model.backbones import BACKBONES
from pipeline.paths import FEATURES_DIR, HISTORY


def ours(workdir: Path) -> dict:
    shutil.rmtree(workdir / "cache" / "augment", ignore_errors=True)  # every variant rendered, none reused
    seconds = {name: run_stage(name, workdir).seconds for name in ("augment", "features", "train")}
    history = read_history(workdir)
    head = [row for row in history if row["phase"] == "head"]
    return {
        "seconds": seconds,
        "total": sum(seconds.values()),
        "precision": feature_store.read_meta(workdir / FEATURES_DIR).precision,
        "epoch": statistics.median(float(r["seconds"]) for r in head[1:] or head),
        "val_accuracy": float(head[-1]["val_accuracy"]),
        "epochs": len(head),
    }


def features_at(workdir: Path, precision: str) -> float:
    """Wall time of the features stage at ``precision``; the features are then made again as before."""
    before = feature_store.read_meta(workdir / FEATURES_DIR).precision
    override_params(workdir / "params.yaml", {"model.precision": precision})
    try:
        return run_stage("features", workdir).seconds
    finally:
        override_params(workdir / "params.yaml", {"model.precision": "auto"})
        if precision != before:
            run_stage("features", workdir)


def read_history(workdir: Path) -> list[dict]:
    with open(workdir / HISTORY, newline="") as fh:
        return list(csv.DictReader(fh))


def fine_tune(workdir: Path, epochs: int, cached: bool) -> dict:
    """Head, then ``epochs`` fine-tuning epochs of the top 2 blocks, with or without the activation
    cache; with it the features stage first runs again, storing the activations (timed too)."""
    override_params(
        workdir / "params.yaml",
        {"train.fine_tune.blocks": 2, "train.fine_tune.epochs": epochs, "train.fine_tune.cache_activations": cached},
    )
    try:
        features = run_stage("features", workdir).seconds if cached else None
        run_stage("train", workdir)
    finally:
        override_params(workdir / "params.yaml", {"train.fine_tune.blocks": 0})
    rows = [row for row in read_history(workdir) if row["phase"] == "fine_tune"]
    cache = sum(path.stat().st_size for path in (workdir / "data/features").glob("*_activations.npy"))
    return {
        "first": float(rows[0]["seconds"]),
        "features": features,
        "cache_mb": cache / 2**20,
        "epoch": statistics.median(float(r["seconds"]) for r in rows[1:] or rows),
        "val_accuracy": float(rows[-1]["val_accuracy"]),
        "images": len([r for r in manifest_rows(workdir / "data/augmented/manifest.csv") if r["split"] == "train"]),
    }


def fine_tune_rows(workdir: Path, epochs: int) -> list[tuple[str, str]]:
    plain, cached = fine_tune(workdir, epochs, cached=False), fine_tune(workdir, epochs, cached=True)
    run_stage("features", workdir)  # back to features without activations, for what runs next
    ratio = cached["epoch"] / plain["epoch"]
    return [
        (
            "fine-tune epoch, top 2 blocks, median of epochs 2.. (no cache / activation cache)",
            f"{plain['epoch']:.2f} s / {cached['epoch']:.2f} s ({plain['images']} train images; first epochs "
            f"{plain['first']:.1f} s / {cached['first']:.1f} s)",
        ),
        (
            "fine-tune epoch ratio (cache / no cache); goal <= 0.5",
            f"{ratio:.2f}: {'met' if ratio <= 0.5 else 'NOT met'}",
        ),
        (
            "fine-tune val_accuracy after the last epoch (no cache / activation cache)",
            f"{plain['val_accuracy']:.3f} / {cached['val_accuracy']:.3f} ({epochs} epochs)",
        ),
        (
            "the cache's price: features stage storing the activations (16-bit, on disk)",
            f"{cached['features']:.1f} s, {cached['cache_mb']:.0f} MiB (train + val)",
        ),
    ]


def run(workdir: Path, epochs: int, fine_tune_epochs: int, float32_features: bool = True) -> list[tuple[str, str]]:
    """Needs ``data/prepared`` in ``workdir`` (bench/data_stages.py, or download + prepare)."""
    import yaml

    if not (workdir / "data/prepared/manifest.csv").is_file():
        run_stage("download", workdir), run_stage("prepare", workdir)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    a = ours(workdir)
    float32_seconds = features_at(workdir, "float32") if float32_features else None
    b = recipe.run(
        workdir,
        BACKBONES[params["model"]["backbone"]].application,
        None,
        params["model"]["image_size"],
        epochs,
        params["train"]["batch_size"],
        params["seed"],
    )
    split = [r["split"] for r in manifest_rows(workdir / "data/prepared/manifest.csv")]
    recipe_forwards = epochs * (split.count("train") + split.count("val"))
    our_forwards = len(manifest_rows(workdir / "data/augmented/manifest.csv"))
    stages = ", ".join(f"{name} {s:.1f}" for name, s in a["seconds"].items())
    rows = [
        ("ours: augment + features + train (head), wall", f"{a['total']:.1f} s ({stages}; {a['precision']})"),
        *([("ours: the features stage at float32 instead", f"{float32_seconds:.1f} s")] if float32_features else []),
        (
            "recipe: a Python process running image_dataset_from_directory + fit (float32), wall",
            f"{b['total']:.1f} s (of which datasets + fit {b['fit']:.1f} s)",
        ),
        ("speed-up, whole (recipe / ours)", f"{b['total'] / a['total']:.2f}x"),
        (
            "backbone forward passes (recipe: epochs x (train + val) / ours: every augmented image once)",
            f"{recipe_forwards} / {our_forwards}: at most {recipe_forwards / our_forwards:.1f}x less backbone work",
        ),
        ("head epoch, median of epochs 2.. (ours / recipe)", f"{a['epoch']:.3f} s / {b['epoch']:.2f} s"),
        ("speed-up, per epoch (recipe / ours)", f"{b['epoch'] / a['epoch']:.0f}x"),
        (
            "val_accuracy after the last epoch (ours / recipe)",
            f"{a['val_accuracy']:.3f} / {b['val_accuracy']:.3f} ({a['epochs']} / {b['epochs']} epochs)",
        ),
        (
            "goal: whole >= 10x faster at equal or better val_accuracy",
            "met" if b["total"] / a["total"] >= 10 and a["val_accuracy"] >= b["val_accuracy"] else "NOT met",
        ),
    ]
    if fine_tune_epochs:
        rows += fine_tune_rows(workdir, fine_tune_epochs)
    rows.append(("load average (1 min) after", load_average()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=0, help="also time this many fine-tuning epochs")
    parser.add_argument("--workdir", type=Path, help="scratch folder to use or reuse (default: a new temporary one)")
    args = parser.parse_args()
    workdir = new_workdir(
        args.workdir or Path(tempfile.mkdtemp(prefix="bench-")),
        args.archive,
        args.per_class,
        args.image_size,
        args.copies,
        args.epochs,
    )
    for name, value in run(workdir, args.epochs, args.fine_tune_epochs):
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
