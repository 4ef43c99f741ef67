"""The export stage, for real: a small model converted to a SavedModel and TFLite, each checked
against the Keras model on test images, and a parity failure stopping the stage in one line."""

import contextlib
import json
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

from conftest import REPO, make_images, set_params
from pipeline.cli import UserError, run_stage
from pipeline.config import HeadParams, ModelParams, ToleranceParams
from pipeline.data.images import model_input
from pipeline.data.manifests import split_files, write_manifest, write_test_probabilities
from pipeline.model import networks
from pipeline.paths import MODEL_FILE, PREPARED_MANIFEST, TEST_PROBABILITIES
from pipeline.stages import export

pytestmark = pytest.mark.slow

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A folder like ``data/model`` after training: ``model.keras`` (raw uint8 images of any size ->
    probabilities; ResNet50 at 32 px with random weights, so only for plumbing) and ``labels.json``."""
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("tiny_model")
    params = ModelParams(
        backbone="resnet50",
        weights="none",
        image_size=32,
        alpha=None,
        precision="float32",
        head=HeadParams(dense_units=0, dropout=0.1),
    )
    extractor = networks.feature_extractor(params)
    images = make_images(root / "images", {label: 4 for label in LABELS}, size=(32, 32))
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(images.rglob("*.jpg"))])
    head = networks.head(networks.standardization(extractor.predict(pixels, verbose=0)), len(LABELS), params.head)
    model_dir = root / "model"
    model_dir.mkdir()
    networks.classifier(extractor, head, params.input_size).save(model_dir / "model.keras")
    (model_dir / "labels.json").write_text(json.dumps(LABELS))
    return model_dir


def trained_project(root: Path, tiny_model: Path) -> Path:
    """What the export stage reads after `train` and `evaluate`: params.yaml, data/model, the test
    split's original files (of several sizes) and the Keras model's probabilities on them."""
    shutil.copytree(tiny_model, root / "data" / "model")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    raw = make_images(root / "data" / "raw", {label: 3 for label in LABELS}, size=(120, 90))
    Image.open(next(raw.glob("red/*.jpg"))).resize((640, 480)).save(raw / "red" / "large.jpg")
    sources = sorted(str(p.relative_to(raw)) for p in raw.rglob("*.jpg"))
    rows = [
        [f"images/{i}.jpg", source.split("/")[0], "test", "0" * 64, 0, 0, source] for i, source in enumerate(sources)
    ]
    write_manifest(root / PREPARED_MANIFEST, ["path", "label", "split", "sha256", "width", "height", "source"], rows)
    with contextlib.chdir(root):
        _, paths = split_files("test")
        # As evaluate makes them the model's input (the server's way): random weights magnify any pixel's change.
        inputs = np.stack([model_input(Path(path), 32) for path in paths])
        write_test_probabilities(networks.load(MODEL_FILE).predict(inputs, verbose=0), paths)
    return root


def test_exports_match_the_keras_model(tmp_path, tiny_model, monkeypatch):
    project = trained_project(tmp_path, tiny_model)
    # float16 on random weights: rounding swamps the features (see params.yaml), so its figures are
    # only recorded here; SavedModel and float32 are held to the default tolerance.
    set_params(project, **{"export.tflite": ["float32", "float16"], "export.tolerance.float16": 1.0})
    monkeypatch.chdir(project)
    export.main()

    report = json.loads((project / "eval" / "export.json").read_text())
    assert report["test_images"] == 10
    assert set(report) == {"test_images", "saved_model", "tflite_float32", "tflite_float16"}
    for name in ("saved_model", "tflite_float32"):
        assert 0 <= report[name]["max_abs_diff"] <= 1e-3, name
    assert 0 <= report["tflite_float16"]["max_abs_diff"] <= 1 and 0 <= report["tflite_float16"]["top1_agreement"] <= 1
    assert report["saved_model"]["top1_agreement"] == report["tflite_float32"]["top1_agreement"] == 1.0
    # float16 weights: half the bytes of float32 (ResNet50's 23.5M weights: about 94 MB vs 47 MB).
    assert report["tflite_float16"]["size_mb"] == pytest.approx(report["tflite_float32"]["size_mb"] / 2, rel=0.05)
    out = project / "data" / "export"
    assert json.loads((out / "labels.json").read_text()) == LABELS
    assert sorted(p.name for p in out.glob("*.tflite")) == ["model_float16.tflite", "model_float32.tflite"]

    # Both formats keep model.keras's contract: uint8 images of any size, not only the test size.
    image = np.random.default_rng(0).integers(0, 256, (2, 45, 70, 3), dtype="uint8")
    expected = networks.load(tiny_model / "model.keras").predict(image, verbose=0)
    import tensorflow as tf

    served = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"](image=tf.constant(image))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    interpreter = Interpreter(model_path=str(out / "model_float32.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    assert list(runner.get_input_details()["image"]["shape_signature"]) == [-1, -1, -1, 3]
    assert runner.get_input_details()["image"]["dtype"] == np.uint8
    np.testing.assert_allclose(runner(image=image)["probabilities"], expected, atol=1e-3)


def test_parity_failure_stops_the_stage_in_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    project = trained_project(tmp_path, tiny_model)
    # TFLite float32 runs the same arithmetic in another order: differences near 1e-6, never 1e-12.
    set_params(project, **{"export.tflite": ["float32"], "export.tolerance.float32": 1e-12})
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as exit_info:
        run_stage(export.main)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: export: tflite_float32 differs from the Keras model by \S+ in probability on "
        r"data/raw/\w+/\w+\.jpg, beyond export\.tolerance\.float32 = 1e-12 "
        r"\(top-1 agreement \S+%\); raise the tolerance or leave the variant out of export\.tflite",
        last,
    ), last
    assert not (project / "data" / "export").exists()  # nothing half-written
    assert not (project / "eval" / "export.json").exists()


def test_probabilities_of_another_model_stop_the_stage_in_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    project = trained_project(tmp_path, tiny_model)
    monkeypatch.chdir(project)
    model = networks.load(MODEL_FILE)
    model.get_layer("head").get_layer("probabilities").set_weights(
        [w + 0.1 for w in model.get_layer("head").get_layer("probabilities").get_weights()]
    )
    model.save(MODEL_FILE)  # retrained, say, and evaluate not run since
    with pytest.raises(SystemExit) as exit_info:
        run_stage(export.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {TEST_PROBABILITIES} is of another model or other test images than {MODEL_FILE}'s: "
        "run the evaluate stage first (dvc repro)"
    )
    TEST_PROBABILITIES.unlink()
    with pytest.raises(SystemExit):
        run_stage(export.main)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {TEST_PROBABILITIES} is missing: run the evaluate stage first (dvc repro)"
    )
    assert not (project / "data" / "export").exists()


def test_parity_figures_and_the_worst_image():
    reference = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    shift = np.array([[0.01, -0.01, 0], [-0.1, 0.3, -0.2], [0.2, 0, -0.2]])  # c's top-1 turns to class 0
    check = export.ParityCheck(
        ["a.jpg", "b.jpg", "c.jpg"],
        [reference[:2], reference[2:]],
        reference,
        ToleranceParams(float32=1e-3, float16=0.5, dynamic_range=0.5),
    )

    def runner():
        outputs = iter([reference[:2] + shift[:2], reference[2:] + shift[2:]])
        return lambda batch: next(outputs)

    assert check("tflite_float16", runner(), "float16") == {"max_abs_diff": 0.3, "top1_agreement": 0.6667}
    with pytest.raises(
        UserError,
        match=r"^export: tflite_float32 differs from the Keras model by 0\.3 in "
        r"probability on b\.jpg, beyond export\.tolerance\.float32 = 0\.001 "
        r"\(top-1 agreement 66\.67%\)",
    ):
        check("tflite_float32", runner(), "float32")
