"""Backbone speed at float32 vs mixed_bfloat16 on this CPU: what ``model.precision: auto`` should pick.

Each backbone's feature extractor (``models.feature_extractor``, as the features stage builds it, at
its native input size) runs ``--batches`` batches of 32 random uint8 images through
``predict_on_batch`` after a warm-up batch, at each precision in turn, ``--repeats`` times
(alternating, so load drifts hit both alike); the best run counts. Weights are random (``none``):
the arithmetic, hence the speed, is the same as with ImageNet weights.

    python bench/precision.py --append bench/results.md   # every backbone in pipeline/model/backbones.py
    python bench/precision.py --backbones mobilenet_v2 inception_v3
"""

import argparse
import time
from pathlib import Path
from typing import Literal

import numpy as np

from common import load_average, machine, report  # also puts the repository on the path, for pipeline
from pipeline.model.backbones import BACKBONES

BATCH = 32
PRECISIONS: tuple[Literal["float32", "mixed_bfloat16"], ...] = ("float32", "mixed_bfloat16")


def images_per_second(name: str, precision: Literal["float32", "mixed_bfloat16"], batches: int) -> float:
    import keras

    from pipeline.config import HeadParams, ModelParams
    from pipeline.model.networks import feature_extractor

    keras.config.set_dtype_policy(precision)
    params = ModelParams(
        backbone=name,
        weights="none",
        image_size=None,
        alpha=None,
        precision=precision,
        head=HeadParams(dense_units=0, dropout=0.0),
    )
    extractor = feature_extractor(params)
    pixels = np.random.default_rng(0).integers(0, 256, (BATCH, params.input_size, params.input_size, 3), dtype="uint8")
    extractor.predict_on_batch(pixels)  # warm-up: builds the graph
    started = time.perf_counter()
    for _ in range(batches):
        extractor.predict_on_batch(pixels)
    keras.backend.clear_session()
    return batches * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--batches", type=int, default=3, help="timed batches of 32 per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--append", type=Path, help="append the section to this file (bench/results.md)")
    args = parser.parse_args()
    info, started = machine(), time.perf_counter()
    rows = []
    for name in args.backbones:
        best = dict.fromkeys(PRECISIONS, 0.0)
        for _ in range(args.repeats):  # alternating, so that load drifts hit both precisions alike
            for precision in PRECISIONS:
                best[precision] = max(best[precision], images_per_second(name, precision, args.batches))
        ratio = best["mixed_bfloat16"] / best["float32"]
        picked = "mixed_bfloat16" if BACKBONES[name].cpu_bfloat16 else "float32"
        rows.append(
            (
                name,
                f"{BACKBONES[name].native_size} px",
                f"{best['float32']:.1f}",
                f"{best['mixed_bfloat16']:.1f}",
                f"{ratio:.2f}",
                picked,
                load_average(),
            )
        )
    report(
        "Backbone speed: float32 vs mixed_bfloat16 on this CPU (what model.precision: auto picks)",
        rows,
        f"python bench/precision.py --batches {args.batches} --repeats {args.repeats}",
        started,
        info,
        args.append,
        header=(
            "backbone",
            "input",
            "float32 images/s",
            "mixed_bfloat16 images/s",
            "bfloat16 / float32",
            "auto picks (CPU with bfloat16 units)",
            "load (1 min) after",
        ),
    )


if __name__ == "__main__":
    main()
