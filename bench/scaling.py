"""How each stage's cost grows with the number of images: generated images, 1,000 to 100,000.

Generated 32x32 PNGs in 10 class folders (each class a colour of its own, each image a random
low-frequency pattern and noise, so that no two are near-duplicates). For each size, a fresh
scratch git + DVC project (``sweep.new_project``) with a quick model (MobileNet 0.25 at 32 px,
random weights, one offline augmented copy, 2 head epochs, no fine-tuning) runs ``dvc repro``,
polled (``sweep.timed_dvc``): each stage's wall time (its process, first to last sight), DVC's own
time after each stage (hashing the stage's outputs, copying them into its cache, writing
dvc.lock, checking the next stage), and the whole run. Prints seconds per 1,000 images per stage
at each size, the growth from the second-largest size to the largest, DVC's share of the wall
time, and how many files each stage's outputs hold (DVC's cost after a stage follows its files).
At the largest size it also times ``dvc add`` of the augmented images as they are (a file per
image and copy) and of the same bytes as one file: what fewer, larger files would save.

    python bench/scaling.py --sizes 1000 10000 100000 --append bench/results.md
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from sweep import DvcRun, env, new_project, timed_dvc

from common import load_average, machine, report

CLASSES = 10
SIDE = 32  # pixels; prepare.min_side's default, MobileNet's smallest input
SETTINGS = {"model.backbone": "mobilenet", "model.alpha": 0.25, "model.image_size": SIDE, "model.weights": "none"}
STAGES = ("download", "prepare", "augment", "features", "label_issues", "train", "evaluate", "export")


def draw_images(root: Path, count: int, seed: int = 0) -> None:
    """``count`` PNGs into ``root/<class>/``, classes in turn: the class's hue times a random 8x8
    brightness pattern blown up to SIDE, plus noise (perceptual hashes differ by ~30 bits)."""
    rng = np.random.default_rng(seed)
    hues = rng.uniform(0.3, 1.0, (CLASSES, 3))
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for start in range(0, count, 1000):
        n = min(1000, count - start)
        patterns = np.kron(rng.uniform(0, 255, (n, 8, 8)), np.ones((SIDE // 8, SIDE // 8)))
        labels = (start + np.arange(n)) % CLASSES
        pixels = patterns[..., None] * hues[labels, None, None] + rng.normal(0, 8, (n, SIDE, SIDE, 3))
        for i, (label, image) in enumerate(zip(labels, np.clip(pixels, 0, 255).astype("uint8"), strict=True)):
            Image.fromarray(image).save(root / f"class_{label}" / f"{start + i:06d}.png")


def subset(images: Path, count: int, into: Path) -> Path:
    """The first ``count`` of ``images`` (drawn for the largest size, classes in turn) as hard links in ``into``."""
    for path in sorted(images.rglob("*.png"), key=lambda p: p.name)[:count]:
        target = into / path.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    return into


def files_in(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else int(path.is_file())


def output_files(project: Path, stage: str) -> int:
    """The files in ``stage``'s DVC outputs (``outs`` in dvc.yaml): what DVC hashes and caches after it."""
    outs = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage].get("outs", [])
    return sum(files_in(project / (out if isinstance(out, str) else next(iter(out)))) for out in outs)


def one_size(root: Path, images: Path, count: int, compare_files: bool) -> tuple[DvcRun, dict[str, int], list]:
    """``dvc repro`` on ``count`` of the images in a new project under ``root``; the run, each
    stage's output files and (``compare_files``) ``files_or_one``'s rows on its augmented images."""
    source = images if files_in(images) == count else subset(images, count, root / f"size-{count}" / "images")
    project = new_project(root / f"size-{count}", source, None, SIDE, 1, 2, SETTINGS)
    run = timed_dvc(project, "repro")
    files = {stage: output_files(project, stage) for stage in STAGES}
    rows = files_or_one(project / "data" / "augmented", root / "hashing") if compare_files else []
    shutil.rmtree(project.parent)  # a 100,000-image project and its DVC cache take gigabytes
    return run, files, rows


def files_or_one(folder: Path, scratch: Path) -> list[tuple[str, str]]:
    """What DVC takes to hash and cache the same bytes as ``folder``'s files and as one file:
    ``dvc add`` of a copy of each, in a new git + DVC repository (DVC's default cache: copies)."""
    scratch.mkdir()
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=scratch, env=env(scratch), check=True)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    shutil.copytree(folder, scratch / "files")
    with open(scratch / "one.bin", "wb") as out:
        for path in paths:
            out.write(path.read_bytes())
    seconds = {}
    for name in ("files", "one.bin"):
        started = time.perf_counter()
        subprocess.run(["dvc", "add", "-q", name], cwd=scratch, env=env(scratch), check=True)
        seconds[name] = time.perf_counter() - started
    mib = (scratch / "one.bin").stat().st_size / 2**20
    shutil.rmtree(scratch)
    return [
        (f"dvc add of data/augmented's {len(paths):,} files ({mib:.0f} MiB)", f"{seconds['files']:.1f} s"),
        ("dvc add of the same bytes as one file", f"{seconds['one.bin']:.1f} s"),
    ]


def per_thousand(seconds: float, count: int) -> str:
    return f"{1000 * seconds / count:.2f}"


def table(runs: dict[int, tuple[DvcRun, dict[str, int], list]]) -> list[tuple[str, ...]]:
    """Rows: per stage, then DVC after it, s per 1,000 images at each size and the growth to the
    largest; then DVC's whole time, the total, DVC's share; then, at the largest size, ``dvc add``
    of the augmented images as files and as one file (seconds, not per 1,000 images)."""
    sizes = sorted(runs)
    last_two = sizes[-2:]

    def row(name: str, seconds: dict[int, float]) -> tuple[str, ...]:
        per = {n: 1000 * seconds[n] / n for n in sizes}
        growth = f"{per[last_two[1]] / per[last_two[0]]:.2f}x" if len(sizes) > 1 and per[last_two[0]] else "-"
        return (name, *(per_thousand(seconds[n], n) for n in sizes), growth)

    rows = []
    for stage in STAGES:
        rows.append(row(stage, {n: runs[n][0].stages[stage].seconds for n in sizes}))
        files = " / ".join(f"{runs[n][1][stage]:,}" for n in sizes)
        rows.append(
            row(f"  DVC after {stage} (its outputs: {files} files)", {n: runs[n][0].dvc_after[stage] for n in sizes})
        )
    own = {n: runs[n][0].seconds - sum(s.seconds for s in runs[n][0].stages.values()) for n in sizes}
    rows.append(row("DVC's own time, all of it (start-up included)", own))
    rows.append(row("dvc repro, wall", {n: runs[n][0].seconds for n in sizes}))
    rows.append(("DVC's share of the wall time", *(f"{100 * own[n] / runs[n][0].seconds:.0f} %" for n in sizes), "-"))
    rows.append(("dvc repro, wall (s)", *(f"{runs[n][0].seconds:.0f}" for n in sizes), "-"))
    largest = runs[sizes[-1]][2]  # files_or_one's (name, value) rows, in the largest size's column
    return rows + [(name, *([""] * (len(sizes) - 1)), value, "") for name, value in largest]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="images per run")
    parser.add_argument("--workdir", type=Path, help="an empty scratch folder (default: a new temporary one)")
    parser.add_argument("--append", type=Path, help="append the section to this file (bench/results.md)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="scaling-"))
    started, info = time.perf_counter(), machine()
    images = root / "images"
    draw_images(images, max(args.sizes))
    runs = {}
    for count in sorted(args.sizes):
        runs[count] = one_size(root, images, count, compare_files=count == max(args.sizes))
        print(f"{count} images: dvc repro {runs[count][0].seconds:.0f} s, load average {load_average()}", flush=True)
    sizes = sorted(args.sizes)
    header = (
        "stage (seconds per 1,000 images)",
        *(f"{n:,} images" for n in sizes),
        f"{sizes[-2]:,} → {sizes[-1]:,}" if len(sizes) > 1 else "growth",
    )
    note = (
        f" {info['cores']} cores ({info['CPU']}), {info['RAM']}; load average (1 min) after: {load_average()}."
        f" Generated {SIDE}x{SIDE} PNGs, {CLASSES} classes; MobileNet 0.25 at {SIDE} px, random weights,"
        " augment.copies 1, 2 head epochs, DVC's default cache (copies)."
    )
    command = f"python bench/scaling.py --sizes {' '.join(map(str, sizes))}"
    report(
        f"Scaling: seconds per 1,000 images per stage, {sizes[0]:,} to {sizes[-1]:,} generated images",
        table(runs),
        command,
        started,
        info,
        args.append,
        note,
        header,
    )
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
