"""Quality with real ImageNet weights: our pipeline vs the keras.io recipe, same test split.

Contenders, all with the same backbone, weights file, image size and epochs, on one scratch project:
- ours, head only, ``augment.copies`` 0 and 2;
- ours, head + fine-tuning the top ``--quality-fine-tune-blocks`` blocks on cached activations;
- the keras.io recipe (``recipe.py``), on our prepare stage's split.

For each: test accuracy, macro F1 and ECE (ours from ``eval/metrics.json``, the recipe's from the
same ``pipeline.report.metrics``), the wall time end to end from the archive, and the wall time it takes
to first reach each ``--thresholds`` test accuracy. Ours end to end is every stage a ``dvc repro``
runs up to ``evaluate``, each its own ``python -m pipeline.<stage>`` process (download, prepare,
augment with an empty render cache, features, train, evaluate; export is left out, as is DVC's
bookkeeping). Its time to an accuracy comes from rerunning train + evaluate with fewer epochs
(``--probe-epochs``; head epochs, or fine-tuning epochs for the fine-tuned contender): the first
of those runs that reaches it, end to end. The recipe's comes from its test predictions after every
epoch, timed from its process's launch (imports included, the test predictions left out).
Ours keeps the project's training defaults (early stopping included); the recipe runs every epoch.

    python bench/quality.py --archive flower_photos.tgz --weights mobilenet_v2_1.0_224_imagenet_no_top.h5
"""

import argparse
import csv
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import recipe
from common import REPO, load_average, machine, new_workdir, run_stage, section
from pipeline.config import load_config, override_params
from pipeline.model.backbones import BACKBONES
from pipeline.paths import HISTORY

BEFORE_TRAIN = ("augment", "features")
TRAIN = ("train", "evaluate")


@dataclass(frozen=True)
class Contender:
    name: str
    overrides: dict  # params.yaml keys set for it
    probe: str  # the epochs key rerun at --probe-epochs to time the accuracy reached on the way


@dataclass(frozen=True)
class Result:
    name: str
    epochs: str
    report: dict  # accuracy, macro_f1, ece
    seconds: float  # end to end
    breakdown: str  # where the time went
    reached: list[tuple[float, float]]  # (seconds end to end, test accuracy), by increasing epochs


def contenders(epochs: int, fine_tune_blocks: int, fine_tune_epochs: int) -> list[Contender]:
    head_only = {"train.epochs": epochs, "train.fine_tune.blocks": 0}
    return [
        Contender("ours: head, augment.copies 0", {**head_only, "augment.copies": 0}, "train.epochs"),
        Contender("ours: head, augment.copies 2", {**head_only, "augment.copies": 2}, "train.epochs"),
        Contender(
            f"ours: head + fine-tuning the top {fine_tune_blocks} blocks (cached activations), copies 2",
            {
                "augment.copies": 2,
                "train.epochs": epochs,
                "train.fine_tune.blocks": fine_tune_blocks,
                "train.fine_tune.epochs": fine_tune_epochs,
            },
            "train.fine_tune.epochs",
        ),
    ]


def test_report(workdir: Path) -> dict:
    metrics = json.loads((workdir / "eval/metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro"]["f1"], "ece": metrics["ece"]}


def epochs_run(workdir: Path) -> str:
    with open(workdir / HISTORY, newline="") as fh:
        phases = [row["phase"] for row in csv.DictReader(fh)]
    return " + ".join(f"{phases.count(phase)} {phase}" for phase in dict.fromkeys(phases))


def ours(workdir: Path, contender: Contender, data_seconds: dict[str, float], probe_epochs: list[int]) -> Result:
    """The contender's pipeline from the prepared data; then train + evaluate again at each of
    ``probe_epochs`` (below its own count) for the time to an accuracy."""
    override_params(workdir / "params.yaml", contender.overrides)
    shutil.rmtree(workdir / "cache" / "augment", ignore_errors=True)  # every variant rendered, none reused
    seconds = {**data_seconds, **{name: run_stage(name, workdir).seconds for name in (*BEFORE_TRAIN, *TRAIN)}}
    full, report, epochs = sum(seconds.values()), test_report(workdir), epochs_run(workdir)
    before_train = full - sum(seconds[name] for name in TRAIN)
    reached = []
    for count in sorted(c for c in probe_epochs if c < contender.overrides[contender.probe]):
        override_params(workdir / "params.yaml", {contender.probe: count})
        reached.append(
            (before_train + sum(run_stage(name, workdir).seconds for name in TRAIN), test_report(workdir)["accuracy"])
        )
    breakdown = " + ".join(f"{name} {s:.0f}" for name, s in seconds.items())
    return Result(contender.name, epochs, report, full, breakdown, [*reached, (full, report["accuracy"])])


def the_recipe(workdir: Path, epochs: int) -> Result:
    cfg = load_config(workdir / "params.yaml")
    figures = recipe.run(
        workdir,
        BACKBONES[cfg.model.backbone].application,
        cfg.model.weights,
        cfg.model.input_size,
        epochs,
        cfg.train.batch_size,
        cfg.seed,
        test=True,
    )
    reached = [(row["elapsed"], row["test_accuracy"]) for row in figures["per_epoch"]]
    return Result(
        "keras.io recipe (frozen backbone, augmentation layers, fit)",
        f"{figures['epochs']}",
        figures["test"],
        figures["total"],
        f"datasets + fit {figures['fit']:.0f}",
        reached,
    )


def time_to(result: Result, accuracy: float) -> str:
    seconds = next((s for s, reached in result.reached if reached >= accuracy), None)
    return "not reached" if seconds is None else f"{seconds:.0f} s"


def run(
    workdir: Path,
    epochs: int,
    fine_tune_blocks: int,
    fine_tune_epochs: int,
    probe_epochs: list[int],
    thresholds: list[float],
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Every contender in ``workdir`` (set up by ``new_project``): the table's header and rows."""
    data_seconds = {name: run_stage(name, workdir).seconds for name in ("download", "prepare")}
    results = []
    for contender in contenders(epochs, fine_tune_blocks, fine_tune_epochs):
        results.append(ours(workdir, contender, data_seconds, probe_epochs))
        print(results[-1], flush=True)  # progress, and what a long run has measured should it be cut short
    results.append(the_recipe(workdir, epochs))
    print(results[-1], flush=True)  # with the recipe's test accuracy after each epoch
    header = (
        "contender",
        "epochs run",
        "test accuracy",
        "macro F1",
        "ECE",
        "wall time, end to end",
        *[f"time to test accuracy {t:.2f}" for t in thresholds],
        "where the time went (s)",
    )
    rows = [
        (
            r.name,
            r.epochs,
            f"{r.report['accuracy']:.3f}",
            f"{r.report['macro_f1']:.3f}",
            f"{r.report['ece']:.3f}",
            f"{r.seconds:.0f} s",
            *[time_to(r, t) for t in thresholds],
            r.breakdown,
        )
        for r in results
    ]
    _, head, tuned, tutorial = results
    goals = [
        ("head only (copies 2) test accuracy >= 0.91", head.report["accuracy"] >= 0.91),
        ("fine-tuned test accuracy >= 0.94", tuned.report["accuracy"] >= 0.94),
        ("ECE <= 0.03 (head only and fine-tuned)", max(head.report["ece"], tuned.report["ece"]) <= 0.03),
        ("head only ahead of the recipe at equal epochs", head.report["accuracy"] > tutorial.report["accuracy"]),
    ]
    blank = [""] * (len(header) - 2)
    rows += [(f"goal: {goal}", "met" if met else "NOT met", *blank) for goal, met in goals]
    rows.append(("wall time, head only (copies 2) / recipe", f"{head.seconds / tutorial.seconds:.2f}", *blank))
    rows.append(("load average (1 min) after", load_average(), *blank))
    return header, rows


def new_project(
    workdir: Path, archive: Path, weights: Path, backbone: str, per_class: int | None, image_size: int, epochs: int
) -> Path:
    """A scratch project for the slice, with the real weights and the project's training defaults."""
    workdir = new_workdir(workdir, archive, per_class, image_size, copies=2, epochs=epochs)
    defaults = load_config(REPO / "params.yaml").train
    override_params(
        workdir / "params.yaml",
        {
            "model.backbone": backbone,
            "model.weights": str(weights.resolve()),
            "train.early_stopping_patience": defaults.early_stopping_patience,
        },
    )
    return workdir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options run_all.py passes on (its --archive and --workdir too)."""
    parser.add_argument("--weights", type=Path, help="an ImageNet weights file (no top) for --backbone")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--quality-per-class", type=int, help="data.max_per_class (default: every image)")
    parser.add_argument("--quality-image-size", type=int, default=224)
    parser.add_argument(
        "--quality-fine-tune-blocks", type=int, default=4, help="top blocks the fine-tuned contender trains"
    )
    parser.add_argument("--quality-fine-tune-epochs", type=int, default=5, help="its fine-tuning epochs")
    parser.add_argument(
        "--probe-epochs",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 3],
        help="epoch counts rerun for the time to an accuracy (comma-separated)",
    )
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.85, 0.90])


def command(args: argparse.Namespace, epochs: int, workdir: Path) -> str:
    per_class = f" --quality-per-class {args.quality_per_class}" if args.quality_per_class else ""
    return (
        f"python bench/quality.py --archive {args.archive} --weights {args.weights} --backbone {args.backbone}"
        f"{per_class} --quality-image-size {args.quality_image_size} --epochs {epochs} "
        f"--quality-fine-tune-blocks {args.quality_fine_tune_blocks} --quality-fine-tune-epochs {args.quality_fine_tune_epochs} "
        f"--probe-epochs {','.join(map(str, args.probe_epochs))} "
        f"--thresholds {' '.join(map(str, args.thresholds))} --workdir {workdir}"
    )


def measure(args: argparse.Namespace, epochs: int, workdir: Path) -> str:
    """The whole measurement as a results.md section."""
    workdir = new_project(
        workdir, args.archive, args.weights, args.backbone, args.quality_per_class, args.quality_image_size, epochs
    )
    header, rows = run(
        workdir,
        epochs,
        args.quality_fine_tune_blocks,
        args.quality_fine_tune_epochs,
        args.probe_epochs,
        args.thresholds,
    )
    scope = f"at most {args.quality_per_class} images per class" if args.quality_per_class else "every image"
    title = f"Quality with real weights: {args.backbone}, {args.weights.name}, {args.quality_image_size} px, {scope}"
    return section(title, rows, command(args, epochs, workdir), header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="the flowers archive (.tgz)")
    parser.add_argument("--epochs", type=int, default=10, help="head epochs (ours, at most) and the recipe's epochs")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    add_arguments(parser)
    args = parser.parse_args()
    if args.weights is None:
        parser.error("--weights is required")
    started = time.perf_counter()
    info = machine()
    text = measure(args, args.epochs, args.workdir or Path(tempfile.mkdtemp(prefix="quality-")))
    print("\n".join(f"| {k} | {v} |" for k, v in info.items()))
    print(f"\n{text}\n({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
