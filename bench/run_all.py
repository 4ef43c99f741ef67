"""Every benchmark on one archive slice, in one scratch project; prints the figures and writes
bench/results.md (machine, settings, figures, and the command reproducing each).

    python bench/run_all.py --per-class 60 --image-size 150 --epochs 10   (what `make bench` runs)
"""

import argparse
import shlex
import tempfile
import time
from pathlib import Path

import data_stages
import extraction_efficiency
import head_vs_tutorial
from common import ARCHIVE, REPO, machine, new_workdir


def section(title: str, rows: list[tuple[str, str]], command: str) -> str:
    lines = [f"## {title}", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join([*lines, "", f"Reproduce: `{command}`", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--per-class", type=int, default=60, help="data.max_per_class")
    parser.add_argument("--image-size", type=int, default=150, help="model.image_size (inception_v3)")
    parser.add_argument("--copies", type=int, default=2, help="augment.copies")
    parser.add_argument("--epochs", type=int, default=10, help="head epochs, both recipes")
    parser.add_argument("--fine-tune-epochs", type=int, default=2, help="0 = skip the fine-tuning timing")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results.md")
    args = parser.parse_args()

    info = machine()
    workdir = new_workdir(args.workdir or Path(tempfile.mkdtemp(prefix="bench-")), args.archive, args.per_class,
                          args.image_size, args.copies, args.epochs)
    slice_args = (f"--archive {shlex.quote(str(args.archive))} --per-class {args.per_class} "
                  f"--image-size {args.image_size} --copies {args.copies}")
    started = time.perf_counter()
    sections = []
    rows = data_stages.run(workdir)
    sections.append(section("Data stages: download, prepare, augment", rows,
                            f"python bench/data_stages.py {slice_args} --workdir {workdir}"))
    rows = extraction_efficiency.run(workdir, repeats=2)
    sections.append(section("Feature extraction efficiency (inception_v3, batch = train.batch_size)", rows,
                            f"python bench/extraction_efficiency.py --workdir {workdir}  (after data_stages.py)"))
    rows = head_vs_tutorial.run(workdir, args.epochs, args.fine_tune_epochs)
    sections.append(section("Head phase vs the keras.io recipe", rows,
                            f"python bench/head_vs_tutorial.py {slice_args} --epochs {args.epochs} "
                            f"--fine-tune-epochs {args.fine_tune_epochs} --workdir {workdir}"))
    minutes = (time.perf_counter() - started) / 60
    for text in sections:
        print(text)

    header = [
        "# Benchmark results", "",
        (f"Written by `make bench` (`python bench/run_all.py {slice_args} --epochs {args.epochs} "
        f"--fine-tune-epochs {args.fine_tune_epochs}`) in {minutes:.1f} min on {time.strftime('%Y-%m-%d')}."), "",
        "| machine | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in info.items()], "",
        (f"Settings: flower_photos archive capped at {args.per_class} images per class, backbone inception_v3 at "
        f"{args.image_size}px (its native 299px is too slow for a ~15 min run on 2 CPU cores), augment.copies "
        f"{args.copies}, {args.epochs} head epochs (our early stopping off so both run exactly that many), "
        "batch size 32. **model.weights=none everywhere: ImageNet weights are unreachable here**, so both "
        "recipes train on features of a random-init backbone and accuracies are low; the comparison is at "
        "equal settings. Stage times are wall times of `python -m pipeline.<stage>` subprocesses (each pays "
        "its own Python + TensorFlow start-up); the recipe is timed in-process from dataset creation to the "
        "end of `fit`. The machine may have been shared with other jobs: see the load averages."), "",
    ]
    args.output.write_text("\n".join(header + sections))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
