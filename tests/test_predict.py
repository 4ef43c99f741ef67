"""The predict CLI on files and folders, from a model file or an MLflow URI, and the shared decoder."""

import json
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import REPO, make_images, project_env, run
from pipeline.cli import UserError
from pipeline.data.images import read_rgb
from pipeline.model import networks
from pipeline.report import tracking
from pipeline.tools import predict

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A folder like data/model: model.keras and labels.json. The exported model's structure
    (networks.classifier: resize, extractor, networks.head) around a one-layer extractor, so that
    loading it takes a moment; the export tests use a real backbone."""
    import keras

    from pipeline.config import HeadParams

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("model")
    extractor = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3), keras.layers.GlobalAveragePooling2D()])
    pixels = np.stack([np.asarray(Image.open(p)) for p in make_images(root / "images", {"a": 6}, (32, 32)).rglob("*.jpg")])
    head = networks.head(extractor.predict(pixels, verbose=0), len(LABELS), HeadParams(dense_units=0, dropout=0.5))
    networks.classifier(extractor, head, 32).save(root / "model.keras")
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root


@pytest.fixture(scope="module")
def model(model_dir):
    return networks.load(model_dir / "model.keras")


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir, model) -> tuple[str, str]:
    """(tracking URI, run id) of a store of its own holding the model logged as the train stage logs
    it (tracking.log_model): registered as ``tiny`` (image_classifier) and ``tiny-keras``."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("predict-test", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as logged:
        tracking.log_model(model, model_dir, "tiny", tracking.About("tiny-data", "/data/tiny", "mobilenet alpha 0.25 at 32 px"))
    return uri, logged.info.run_id


def expected_top(model, path: Path, k: int = 3) -> list[tuple[str, float]]:
    probabilities = model.predict(read_rgb(path)[np.newaxis], verbose=0)[0]
    return sorted(zip(LABELS, probabilities.tolist()), key=lambda pair: -pair[1])[:k]


def parse_line(line: str) -> tuple[str, list[tuple[str, float]]]:
    path, *ranked = line.split("\t")
    return path, [(label, float(p)) for label, p in (item.split(" ") for item in ranked)]


def test_folder_with_a_corrupt_file_prints_the_rest_and_exits_1(tmp_path, model_dir, model):
    folder = make_images(tmp_path / "photos", {"red": 2, "green": 1}, size=(50, 40))
    Image.new("RGBA", (30, 60), (255, 0, 0, 128)).save(folder / "green" / "transparent.png")
    (folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not a candidate")
    result = run([sys.executable, "-m", "pipeline.tools.predict", str(folder), "--model", str(model_dir / "model.keras")],
                 tmp_path, check=False, env={**project_env(tmp_path), "PYTHONPATH": str(REPO)})

    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    images = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png") and p.name != "broken.jpg")
    assert [parse_line(line)[0] for line in lines] == [str(p) for p in images]
    for line, image in zip(lines, images, strict=True):
        ranked, expected = parse_line(line)[1], expected_top(model, image)
        assert [label for label, _ in ranked] == [label for label, _ in expected]
        assert [p for _, p in ranked] == pytest.approx([p for _, p in expected], abs=5e-4)  # printed with 3 decimals
    broken = folder / "red" / "broken.jpg"
    assert [line for line in result.stderr.splitlines() if line.startswith("skipped ")] == [
        f"skipped {broken}: cannot read image (UnidentifiedImageError: cannot identify image file '{broken}')"]
    assert "Traceback" not in result.stderr


def test_single_file_as_json_with_top_k_capped(tmp_path, model_dir, model, capsys):
    image = next(make_images(tmp_path, {"blue": 1}, size=(64, 33)).rglob("*.jpg"))
    predict.main([str(image), "--model", str(model_dir / "model.keras"), "--json", "--top-k", "7"])
    captured = capsys.readouterr()
    assert captured.err == "note: --top-k 7 is more than the model's 3 classes; showing all of them\n"
    out = captured.out.strip().splitlines()
    assert len(out) == 1
    answer = json.loads(out[0])
    assert answer["path"] == str(image)
    expected = expected_top(model, image)
    assert [p["label"] for p in answer["predictions"]] == [label for label, _ in expected]  # 3 classes, not 7
    assert [p["probability"] for p in answer["predictions"]] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_top_k_below_1_is_a_usage_error(tmp_path, model_dir, capsys):
    image = next(make_images(tmp_path, {"red": 1}).rglob("*.jpg"))
    with pytest.raises(SystemExit) as exited:
        predict.main([str(image), "--model", str(model_dir / "model.keras"), "--top-k", "0"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("argument --top-k: must be a whole number >= 1 (got '0')")


def test_served_model_caps_top_k_at_the_classes_and_refuses_below_1(tmp_path, store, model):
    """The image_classifier model as the train stage logs it, loaded from the registry."""
    mlflow.set_tracking_uri(store[0])
    classifier = mlflow.pyfunc.load_model("models:/tiny@candidate")
    image = next(make_images(tmp_path, {"red": 1}).rglob("*.jpg"))
    request = pd.DataFrame({"image": [image.read_bytes()]})
    answer = classifier.predict(request, params={"top_k": 7}).iloc[0]
    expected = expected_top(model, image)
    assert [p["label"] for p in answer["top_k"]] == [label for label, _ in expected]  # 3 classes, not 7
    assert [p["probability"] for p in answer["top_k"]] == pytest.approx([p for _, p in expected], abs=1e-5)
    assert answer["label"] == expected[0][0]
    for top_k in (0, -2):
        with pytest.raises(MlflowException, match=rf"params.top_k must be 1 or more \(got {top_k}\)$") as refused:
            classifier.predict(request, params={"top_k": top_k})
        assert refused.value.get_http_status_code() == 400


def test_served_model_reports_its_own_failure_as_500_without_a_traceback(tmp_path, store, monkeypatch, caplog):
    mlflow.set_tracking_uri(store[0])
    classifier = mlflow.pyfunc.load_model("models:/tiny@candidate")
    image = next(make_images(tmp_path, {"red": 1}).rglob("*.jpg"))

    def broken(*args, **kwargs):
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(classifier.unwrap_python_model().model, "predict_on_batch", broken)
    with pytest.raises(MlflowException) as failed:
        classifier.predict(pd.DataFrame({"image": [image.read_bytes()]}))
    assert failed.value.get_http_status_code() == 500
    assert failed.value.message == "image 0: the prediction failed (RuntimeError); the server's log has the details"
    assert "out of device memory" in caplog.text  # the traceback, in the server's log only


def test_model_from_mlflow_runs_and_models_uris(tmp_path, store, model, monkeypatch, capsys):
    """The Keras flavor by run, version and alias; its class names come from its metadata. No copy
    of the weights is left in the temp dir (MLflow's default download folder is never removed)."""
    uri, run_id = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    image = next(make_images(tmp_path / "photos", {"red": 1}).rglob("*.jpg"))
    expected = expected_top(model, image)

    predict.main([str(image), "--model", f"runs:/{run_id}/model"])
    path, ranked = parse_line(capsys.readouterr().out.strip())
    assert path == str(image) and [label for label, _ in ranked] == [label for label, _ in expected]
    for registered in ("models:/tiny-keras/1", "models:/tiny-keras@candidate"):
        predict.main([str(image), "--model", registered, "--top-k", "1"])
        printed = capsys.readouterr()
        assert printed.out == f"{image}\t{expected[0][0]} {expected[0][1]:.3f}\n"
        assert "Downloading artifacts" not in printed.err  # MLflow's progress bar: off (pipeline/__init__.py)
    assert not list(scratch.rglob("*.keras"))  # only MLflow's MLmodel files of get_model_info

    with pytest.raises(UserError, match=r"^--model runs:/0123456789abcdef/model: "):
        predict.main([str(image), "--model", "runs:/0123456789abcdef/model"])
    with pytest.raises(UserError, match=rf"^--model models:/tiny/1 is not a Keras model \(flavors: "
                                        rf"python_function\); use the run's Keras model, runs:/{run_id}/model$"):
        predict.main([str(image), "--model", "models:/tiny/1"])


def test_usage_errors_are_one_line(tmp_path, model_dir):
    image = next(make_images(tmp_path, {"red": 1}).rglob("*.jpg"))
    with pytest.raises(UserError, match=r"^no model at .*missing\.keras: run the pipeline first \(dvc repro\)"):
        predict.main([str(image), "--model", str(tmp_path / "missing.keras")])
    (tmp_path / "labels.json").write_text('["only", "two"]')
    with pytest.raises(UserError, match=r"^the model has 3 classes but the labels list 2: pass the labels\.json"):
        predict.main([str(image), "--model", str(model_dir / "model.keras"), "--labels", str(tmp_path / "labels.json")])


def test_decoder_makes_upright_8_bit_rgb(tmp_path):
    grey16 = np.full((4, 6), 128 * 257, dtype=np.uint16)  # 16-bit grey that is 128 in 8 bits
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert read_rgb(tmp_path / "grey16.png").tolist() == np.full((4, 6, 3), 128).tolist()  # Pillow alone: 255

    Image.new("RGBA", (3, 2), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (read_rgb(tmp_path / "clear.png") == 255).all()  # transparent -> white, not the black below

    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert read_rgb(tmp_path / "cmyk.jpg")[0, 0].tolist() == pytest.approx([255, 0, 0], abs=3)

    rotated = Image.new("RGB", (8, 2), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display upright
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_rgb(tmp_path / "rotated.jpg").shape == (8, 2, 3)


def test_a_fifo_is_skipped_not_read_forever(tmp_path):
    import os

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # opening it for reading would block until someone writes
    assert list(predict.image_files([fifo, tmp_path / "missing.jpg"])) == [
        (fifo, "not a regular file (a FIFO, socket or device)"), (tmp_path / "missing.jpg", "no such file or folder")]
