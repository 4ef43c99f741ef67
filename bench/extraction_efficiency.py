"""Feature extraction efficiency: our end-to-end extraction vs the model alone on in-memory tensors.

End to end is what ``pipeline/stages/features.py`` does: ``features.extract`` (read + decode JPEGs with
tf.data, in parallel, prefetched, the last batch padded, on every device of ``pipeline.model.devices``),
at the stage's precision (``model.precision``). The references run the same extractor, same batch
size, on the same images already decoded into one numpy array: with ``model.predict`` (the
issue's reference) and with a bare ``predict_on_batch`` loop over slices (the pure forward pass).
Each is timed ``--repeats`` times after a warm-up; the best run counts.
Needs ``data/augmented`` in the workdir (bench/data_stages.py or bench/head_vs_tutorial.py).

    python bench/extraction_efficiency.py --workdir /tmp/bench-xyz
"""

import argparse
import os
import time
from pathlib import Path

from common import load_average, manifest_rows


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def run(workdir: Path, repeats: int) -> list[tuple[str, str]]:
    import numpy as np

    from pipeline.config import load_config
    from pipeline.data.manifests import image_batches
    from pipeline.model.devices import distribution_strategy
    from pipeline.model.networks import feature_extractor, use_precision
    from pipeline.stages.features import extract, on_every_replica

    strategy = distribution_strategy()
    cfg = load_config(workdir / "params.yaml")
    policy = use_precision(cfg.model)
    batch_size = cfg.train.batch_size
    augmented = workdir / "data/augmented"
    paths = [str(augmented / row["path"]) for row in manifest_rows(augmented / "manifest.csv")]
    with strategy.scope():
        extractor = feature_extractor(cfg.model)
    on_replicas = on_every_replica(extractor, strategy)
    pixels = np.concatenate([batch.numpy() for batch in image_batches(paths, batch_size)])
    padded = np.concatenate([pixels, pixels[: -len(pixels) % batch_size]])  # whole batches: one trace

    def end_to_end():
        for _ in extract(on_replicas, strategy, paths, batch_size, desc="end to end"):
            pass

    def forward_only():
        for start in range(0, len(padded), batch_size):
            extractor.predict_on_batch(padded[start : start + batch_size])

    next(extract(on_replicas, strategy, paths[:batch_size], batch_size, desc="warm-up"))  # warm-ups: build the graphs
    extractor.predict_on_batch(pixels[:batch_size])
    extractor.predict(pixels[:batch_size], batch_size=batch_size, verbose=0)
    e2e = best_of(repeats, end_to_end)
    with_predict = best_of(repeats, lambda: extractor.predict(pixels, batch_size=batch_size, verbose=0))
    forward = best_of(repeats, forward_only)
    n = len(paths)
    return [
        ("images / batch size / input size / precision", f"{n} / {batch_size} / {cfg.model.input_size}px / {policy}"),
        ("end to end (read + decode + forward, as features.py)", f"{n / e2e:.1f} images/s"),
        ("model.predict on in-memory uint8 array", f"{n / with_predict:.1f} images/s"),
        ("predict_on_batch loop on in-memory slices", f"{n / forward:.1f} images/s"),
        ("efficiency: end to end / model.predict", f"{with_predict / e2e:.2f}"),
        ("efficiency: end to end / predict_on_batch loop", f"{forward / e2e:.2f}"),
        ("goal: end to end / model.predict >= 0.9", "met" if with_predict / e2e >= 0.9 else "NOT met"),
        ("load average (1 min) after", load_average()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="scratch project holding data/augmented")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.chdir(args.workdir)
    for name, value in run(args.workdir.resolve(), args.repeats):
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
