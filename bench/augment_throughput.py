"""Throughput of the offline augment stage on a real archive, with a cold and a warm render cache.

Runs download + prepare once in a scratch folder outside the repository (or reuses one given with
--workdir that already holds data/prepared), then times ``python -m pipeline.stages.augment`` there, as
DVC would run it, on all cores: first with an empty render cache (every file rendered), then again
(every file from the cache, as after `dvc repro` with nothing new). Prints images written per
second (whole stage wall time, start-up and gallery included), the CPU time it took, and the
command to reproduce.

    python bench/augment_throughput.py --archive flower_photos.tgz
"""

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage(name: str, workdir: Path) -> tuple[float, float]:
    """Run one pipeline stage in ``workdir``; return its wall time and CPU time (all processes) in seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_CACHE_DIR": str(workdir / "cache")}
    started, cpu = time.perf_counter(), cpu_seconds()
    subprocess.run(
        [sys.executable, "-m", f"pipeline.stages.{name}"], cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - started, cpu_seconds() - cpu


def write_params(workdir: Path, archive: Path, copies: int, image_size: int | None) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["url"] = str(archive)
    params["model"]["weights"] = "none"
    params["model"]["image_size"] = image_size
    params["augment"]["copies"] = copies
    params["augment"]["mode"] = "offline"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="the flowers archive (.tgz)")
    parser.add_argument("--workdir", type=Path, help="scratch folder to use or reuse (default: a new temporary one)")
    parser.add_argument("--copies", type=int, default=2, help="augment.copies (default 2)")
    parser.add_argument("--image-size", type=int, default=None, help="model.image_size (default: inception_v3's 299)")
    args = parser.parse_args()

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="augment-bench-"))).resolve()
    if workdir.is_relative_to(REPO):
        sys.exit("--workdir must be outside the repository")
    workdir.mkdir(parents=True, exist_ok=True)
    write_params(workdir, args.archive.resolve(), args.copies, args.image_size)
    if not (workdir / "data" / "prepared" / "manifest.csv").is_file():
        seconds = stage("download", workdir)[0] + stage("prepare", workdir)[0]
        print(f"download + prepare: {seconds:.1f}s")

    shutil.rmtree(workdir / "cache" / "augment", ignore_errors=True)
    (cold, cold_cpu), (warm, warm_cpu) = stage("augment", workdir), stage("augment", workdir)
    with open(workdir / "data" / "augmented" / "manifest.csv", newline="") as fh:
        written = sum(1 for _ in csv.DictReader(fh))
    with open(workdir / "data" / "prepared" / "manifest.csv", newline="") as fh:
        sources = sum(1 for _ in csv.DictReader(fh))
    cores = os.cpu_count()
    print(
        f"augment, {sources} prepared images -> {written} written ({args.copies} copies per training image), "
        f"{cores} cores:"
    )
    # CPU time shows what the machine could do when other work competes for its cores.
    print(
        f"  empty render cache: {cold:.1f}s = {written / cold:.1f} images written/s ({sources / cold:.1f} "
        f"source images/s); {cold_cpu:.1f} CPU-s = {written / cold_cpu:.1f} images per CPU-second"
    )
    print(f"  warm render cache:  {warm:.1f}s = {written / warm:.1f} images written/s; {warm_cpu:.1f} CPU-s")
    print(f"  load average during the runs: {os.getloadavg()[0]:.1f} (on {cores} cores)")
    print(
        f"reproduce: python bench/augment_throughput.py --archive {args.archive} --copies {args.copies}"
        + (f" --image-size {args.image_size}" if args.image_size else "")
        + f" --workdir {workdir}"
    )


if __name__ == "__main__":
    main()
