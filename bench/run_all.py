"""Every benchmark on one archive slice, in one scratch project; prints the figures and writes
bench/results.md (machine, settings, figures, and the command reproducing each).

    python bench/run_all.py --archive flower_photos.tgz --per-class 40 --image-size 299 --epochs 10 --more-epochs 20 \
        --weights mobilenet_v2_1.0_224_imagenet_no_top.h5   (what `make bench` runs)

With ``--weights``, the last sections are bench/quality.py's, on the whole archive unless
``--quality-per-class``, and bench/head_settings.py's on the features it left.
"""

import argparse
import shlex
import tempfile
import time
from pathlib import Path

import data_stages
import extraction_efficiency
import head_settings
import head_vs_tutorial
import quality

from common import REPO, add_slice_arguments, machine, new_workdir, placeholders, section
from pipeline.config import override_params

NOTES = (
    "Reading the figures: our feature extraction runs the backbone once per (image, augmented copy), "
    "the recipe once per image per epoch, so the whole-pipeline speed-up is bounded by the ratio of "
    "backbone forward passes (a row below) times what bfloat16 buys on this CPU, less our fixed per-stage "
    "costs (Python + TensorFlow start-up, building the backbone, logging and registering the model in "
    "MLflow: ~25 s over the three stages); it grows with the data and the epochs. With random-init backbones the features are tiny (~1e-4) and the recipe's plain head barely "
    "moves from chance (0.2 for 5 classes), while ours standardizes the features first (networks.head)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--epochs", type=int, default=10, help="head epochs, both recipes")
    parser.add_argument(
        "--more-epochs",
        type=int,
        default=30,
        help="then compare again at this many epochs (fixed costs amortized); 0 = skip",
    )
    parser.add_argument("--fine-tune-epochs", type=int, default=2, help="0 = skip the fine-tuning timing")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results.md")
    quality.add_arguments(parser)
    args = parser.parse_args()

    info = machine()
    workdir = new_workdir(
        args.workdir or Path(tempfile.mkdtemp(prefix="bench-")),
        args.archive,
        args.per_class,
        args.image_size,
        args.copies,
        args.epochs,
    )
    slice_args = (
        f"--archive {shlex.quote(str(args.archive))} --per-class {args.per_class} "
        f"--image-size {args.image_size} --copies {args.copies}"
    )
    started = time.perf_counter()
    sections = []
    rows = data_stages.run(workdir)
    sections.append(
        section(
            "Data stages: download, prepare, augment",
            rows,
            f"python bench/data_stages.py {slice_args} --workdir {workdir}",
        )
    )
    rows = extraction_efficiency.run(workdir, repeats=2)
    sections.append(
        section(
            "Feature extraction efficiency (inception_v3, batch = train.batch_size)",
            rows,
            f"python bench/extraction_efficiency.py --workdir {workdir}  (after data_stages.py)",
        )
    )
    rows = head_vs_tutorial.run(workdir, args.epochs, args.fine_tune_epochs)
    sections.append(
        section(
            "Head phase vs the keras.io recipe",
            rows,
            f"python bench/head_vs_tutorial.py {slice_args} --epochs {args.epochs} "
            f"--fine-tune-epochs {args.fine_tune_epochs} --workdir {workdir}",
        )
    )
    if args.more_epochs:
        override_params(workdir / "params.yaml", {"train.epochs": args.more_epochs})
        rows = head_vs_tutorial.run(workdir, args.more_epochs, fine_tune_epochs=0, float32_features=False)
        sections.append(
            section(
                f"Head phase vs the keras.io recipe at {args.more_epochs} epochs",
                rows,
                f"python bench/head_vs_tutorial.py {slice_args} --epochs {args.more_epochs} --workdir {workdir}",
            )
        )
    if args.weights:
        sections.append(quality.measure(args, args.epochs, workdir / "quality"))
        settings_header, settings_rows = head_settings.run(workdir / "quality", head_settings.SEEDS)
        sections.append(
            section(
                "Head settings on those features (seeds: the table's spread)",
                settings_rows,
                f"python bench/head_settings.py --workdir {workdir / 'quality'}  (after quality.py)",
                settings_header,
            )
        )
    minutes = (time.perf_counter() - started) / 60
    for text in sections:
        print(text)

    command = (
        f"python bench/run_all.py {slice_args} --epochs {args.epochs} --fine-tune-epochs {args.fine_tune_epochs} "
        f"--more-epochs {args.more_epochs}{f' --weights {args.weights}' if args.weights else ''}"
    )
    intro = [
        "# Benchmark results",
        "",
        (f"Written by `make bench` (`{placeholders(command)}`) in {minutes:.1f} min on {time.strftime('%Y-%m-%d')}."),
        "",
        "| machine | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        (
            f"Settings: flower_photos archive capped at {args.per_class} images per class, backbone inception_v3 at "
            f"{args.image_size}px, augment.copies "
            f"{args.copies}, {args.epochs} head epochs (our early stopping off so both run exactly that many), "
            "batch size 32. **model.weights=none in every section but the quality one** (the Inception v3 "
            "runs take no ImageNet weights), so both recipes train on features of a random-init backbone and "
            "accuracies are low; the comparison is at equal settings. The quality section (with `--weights`) uses "
            "real ImageNet weights of a MobileNetV2. Stage times are wall times of `python -m pipeline.<stage>` subprocesses (each pays "
            "its own Python + TensorFlow start-up), and so is the recipe's (a Python process of its own). Ours runs "
            "at `model.precision: auto` (the precision it used is shown), the recipe in float32 as written. The machine may have been shared with other jobs: see the load averages."
        ),
        "",
        NOTES,
        "",
    ]
    args.output.write_text("\n".join(intro + sections))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
