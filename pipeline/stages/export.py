"""Stage 7, export: the trained model as a TensorFlow SavedModel and TFLite files, checked for parity.

Inputs: ``data/model/`` (``model.keras``, ``labels.json``), the test split's original files (in
``data/raw``, listed by ``data/prepared/manifest.csv``) and the Keras model's probabilities on them,
which evaluate wrote as served (``data/test_probabilities.npz``). Outputs in ``data/export/``:
- ``saved_model/``: signature ``serving_default`` (also the method ``serve``), input ``image``:
  uint8 ``(batch, height, width, 3)`` of any size, output ``probabilities`` ``(batch, classes)``;
  the same contract as ``model.keras``, for TensorFlow Serving or ``tf.saved_model.load``. For the
  answers evaluate reported, feed it pipeline/data/images.py ``model_input`` at the model's input
  size (other sizes are resized in the graph: bilinear, no antialiasing, no EXIF or colour profile);
- ``model_<variant>.tflite`` for each of ``export.tflite``, converted from that SavedModel with
  the same signature: ``float32``; ``float16`` (weights stored as float16, half the size);
  ``dynamic_range`` (weights stored as int8, a quarter, activations quantized on the fly);
- ``labels.json``: the class names, index = output column.
Each format's probabilities on every test file, made its input by ``model_input`` as the server
makes it, are compared with the Keras model's as evaluate recorded them; the figures
go to ``eval/export.json`` (DVC metrics) and any difference beyond ``export.tolerance`` fails the stage.
"""

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter  # tf.lite.Interpreter is deprecated in its favour

from pipeline.cli import UserError, first_line, run_stage, stderr_filtered
from pipeline.config import ToleranceParams, load_config
from pipeline.data.images import model_input
from pipeline.data.manifests import read_test_probabilities, split_files
from pipeline.files import atomic_dir, write_json
from pipeline.model import networks
from pipeline.paths import EXPORT_DIR, EXPORT_REPORT, MODEL_FILE, MODEL_LABELS, PREPARED_MANIFEST

SIGNATURE = "serving_default"
BATCH_SIZE = 32  # test images per call; any size gives the same figures
# Warnings TF's converter logs on every conversion, about options it sets itself: nothing to act on.
CONVERTER_NOISE = (b"] Ignored output_format.\n", b"] Ignored drop_control_dependency.\n")

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 image batch -> probabilities


def export_saved_model(model: keras.Model, path: Path) -> None:
    # Not model.export(): Keras 3.15's Resizing layer defaults to training=True and that leaks to
    # the layers after it, so the served model would run Dropout; and model.export() tracks the
    # model explicitly, which stores every weight twice. Not keras.export.ExportArchive either: it
    # traces the model once more before saving (~0.4 s). The module holds the model's TensorFlow
    # variables (each once) and the endpoint, which tf.saved_model.save traces.
    module = tf.Module()
    module.model_variables = [variable.value for variable in model.variables]  # the tf.Variable under each
    module.serve = tf.function(
        lambda image: {"probabilities": model(image, training=False)},
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="image")],
    )
    tf.saved_model.save(module, str(path), signatures={SIGNATURE: module.serve})


def convert_to_tflite(saved_model: Path, variant: str) -> bytes:
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: int8 weights (dynamic range)
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        with stderr_filtered(lambda line: not line.endswith(CONVERTER_NOISE)):
            return converter.convert()
    except Exception as err:  # ConverterError and friends; the converter has logged the details above
        raise UserError(
            f"export: TFLite {variant} conversion failed ({first_line(err)[:200]}); "
            "leave the variant out of export.tflite"
        ) from None


def saved_model_runner(path: Path) -> Runner:
    serve = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    return lambda images: serve(image=tf.constant(images))["probabilities"].numpy()


def tflite_runner(path: Path) -> Runner:
    interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count())
    run = interpreter.get_signature_runner(SIGNATURE)  # resizes its input to each batch's shape
    return lambda images: run(image=images)["probabilities"]


@dataclass
class ParityCheck:
    """The test images, the Keras model's probabilities on them, and the differences allowed."""

    paths: list[str]
    batches: list[np.ndarray]
    reference: np.ndarray
    tolerance: ToleranceParams

    def __call__(self, name: str, runner: Runner, precision: str) -> dict:
        """Parity figures of one format; a difference beyond ``export.tolerance.<precision>`` fails."""
        outputs = np.concatenate([runner(batch) for batch in self.batches])
        per_image = np.abs(outputs - self.reference).max(axis=1)
        worst = int(per_image.argmax())
        figures = {
            "max_abs_diff": float(f"{per_image[worst]:.3g}"),
            "top1_agreement": round(float(np.mean(outputs.argmax(axis=1) == self.reference.argmax(axis=1))), 4),
        }
        allowed = getattr(self.tolerance, precision)
        if per_image[worst] > allowed:
            raise UserError(
                f"export: {name} differs from the Keras model by {per_image[worst]:.3g} in probability on "
                f"{self.paths[worst]}, beyond export.tolerance.{precision} = {allowed:g} (top-1 agreement "
                f"{figures['top1_agreement']:.2%}); raise the tolerance or leave the variant out of export.tflite"
            )
        return figures


def timed(write: Callable[[], object]) -> float:
    started = time.perf_counter()
    write()
    return time.perf_counter() - started


def described(name: str, path: Path, seconds: float, figures: dict) -> dict:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    entry = {**figures, "size_mb": round(sum(p.stat().st_size for p in files) / 1e6, 2)}
    print(
        f"export: {name}: {entry['size_mb']} MB, written in {seconds:.1f}s; largest probability difference "
        f"{figures['max_abs_diff']:.3g}, top-1 agreement {figures['top1_agreement']:.2%}",
        flush=True,
    )
    return entry


def main() -> None:
    cfg = load_config()
    for path in (MODEL_FILE, PREPARED_MANIFEST):
        if not path.is_file():
            raise UserError(f"{path} is missing: run the earlier stages first (dvc repro)")
    _, paths = split_files("test")
    if not paths:
        raise UserError(f"{PREPARED_MANIFEST} lists no test images to check the exports on")
    # The Keras model's probabilities, as evaluate computed them on the same files (one pass per run).
    reference = read_test_probabilities(paths)
    model = networks.load(MODEL_FILE)
    size = networks.input_size(model)
    inputs = np.stack([model_input(Path(path), size) for path in paths])
    batches = [inputs[start : start + BATCH_SIZE] for start in range(0, len(inputs), BATCH_SIZE)]
    check = ParityCheck(paths, batches, reference, cfg.export.tolerance)
    report: dict[str, Any] = {"test_images": len(paths)}
    with atomic_dir(EXPORT_DIR) as out:
        saved_model = out / "saved_model"
        seconds = timed(lambda: export_saved_model(model, saved_model))
        report["saved_model"] = described(
            "saved_model", saved_model, seconds, check("saved_model", saved_model_runner(saved_model), "float32")
        )
        for variant in cfg.export.tflite:
            name, path = f"tflite_{variant}", out / f"model_{variant}.tflite"
            seconds = timed(
                lambda path=path, variant=variant: path.write_bytes(convert_to_tflite(saved_model, variant))  # type: ignore[misc]
            )
            report[name] = described(name, path, seconds, check(name, tflite_runner(path), variant))
        shutil.copy(MODEL_LABELS, out / MODEL_LABELS.name)
    write_json(EXPORT_REPORT, report)
    print(f"export: {1 + len(cfg.export.tflite)} formats in {EXPORT_DIR}, within tolerance on {len(paths)} test images")


if __name__ == "__main__":
    run_stage(main)
