"""The predict CLI on files and folders, from a model file or an MLflow URI, and the shared decoder."""

import io
import json
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import REPO, SHARED, make, make_images, new_project, project_env, require_shared, run
from pipeline.cli import UserError
from pipeline.data.images import model_input, read_rgb
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
    extractor = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3), keras.layers.GlobalAveragePooling2D()]
    )
    pixels = np.stack(
        [np.asarray(Image.open(p)) for p in make_images(root / "images", {"a": 6}, (32, 32)).rglob("*.jpg")]
    )
    head = networks.head(
        networks.standardization(extractor.predict(pixels, verbose=0)),
        len(LABELS),
        HeadParams(dense_units=0, dropout=0.5),
    )
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
        tracking.log_model(
            model, model_dir, "tiny", tracking.About("tiny-data", "/data/tiny", "mobilenet alpha 0.25 at 32 px")
        )
    return uri, logged.info.run_id


def expected_top(model, path: Path, k: int = 3) -> list[tuple[str, float]]:
    """The model's answer for the file made its input as on every path (images.model_input at 32 px)."""
    probabilities = model.predict(model_input(path, 32)[np.newaxis], verbose=0)[0]
    return sorted(zip(LABELS, probabilities.tolist()), key=lambda pair: -pair[1])[:k]


def parse_line(line: str) -> tuple[str, list[tuple[str, float]]]:
    path, *ranked = line.split("\t")
    return path, [(label, float(p)) for label, p in (item.split(" ") for item in ranked)]


def test_folder_with_a_corrupt_file_prints_the_rest_and_exits_1(tmp_path, model_dir, model):
    folder = make_images(tmp_path / "photos", {"red": 2, "green": 1}, size=(50, 40))
    Image.new("RGBA", (30, 60), (255, 0, 0, 128)).save(folder / "green" / "transparent.png")
    (folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not a candidate")
    result = run(
        [sys.executable, "-m", "pipeline.tools.predict", str(folder), "--model", str(model_dir / "model.keras")],
        tmp_path,
        check=False,
        env={**project_env(tmp_path), "PYTHONPATH": str(REPO)},
    )

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
        f"skipped {broken}: cannot read image (UnidentifiedImageError: cannot identify image file '{broken}')"
    ]
    assert "Traceback" not in result.stderr


def test_make_predict_takes_paths_with_spaces_and_runs_nothing_they_hold(tmp_path, model_dir, model):
    """PATHS and ARGS are split like a shell line, by Python: quotes group, nothing is evaluated."""
    image = next(make_images(tmp_path / "my photos", {"red": 1}).rglob("*.jpg"))
    spaced = image.rename(image.with_name("a photo.jpg"))
    marker = tmp_path / "ran"
    project = new_project(tmp_path / "project", tmp_path / "my photos")
    paths = f"'{spaced}' '{tmp_path}/x.jpg; touch {marker}' `touch {marker}`"
    result = run(
        make("predict", PATHS=paths, ARGS=f"--model '{model_dir / 'model.keras'}' --top-k 1"), project, check=False
    )
    assert not marker.exists()
    assert result.stdout.splitlines() == [
        f"{spaced}\t{expected_top(model, spaced, 1)[0][0]} {expected_top(model, spaced, 1)[0][1]:.3f}"
    ], result.stderr
    assert [line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("skipped ")] == [
        f"skipped {tmp_path}/x.jpg; touch {marker}",
        "skipped `touch",
        f"skipped {marker}`",
    ]
    assert result.returncode != 0


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


def test_mlflow_checks_the_logged_classifier_on_its_example_with_the_model_in_memory(
    tmp_path, model_dir, model, monkeypatch
):
    """Logging the image_classifier, MLflow loads it and predicts its input example (it only warns if
    that fails): the Keras model it gets is the one being logged, not a copy read back from the
    store, and the prediction runs; the example is kept with the model for users."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("check", artifact_location=(tmp_path / "artifacts").as_uri())
    looked_up: list[str] = []
    predicted: list[tuple] = []

    class Recorded(dict):
        def __getitem__(self, uri):
            looked_up.append(uri)
            return super().__getitem__(uri)

    monkeypatch.setattr(networks, "LOGGING", Recorded())
    monkeypatch.setattr(mlflow.keras, "load_model", lambda *args, **kwargs: pytest.fail("read back from the store"))
    predict_on_batch = model.predict_on_batch
    monkeypatch.setattr(model, "predict_on_batch", lambda x: predicted.append(x.shape) or predict_on_batch(x))
    with mlflow.start_run(experiment_id=experiment):
        logged = tracking.log_model(model, model_dir, None, tracking.About("d", "/d", "tiny"))
    keras_model = mlflow.get_logged_model(logged["model"]["model_id"])
    assert looked_up == [f"models:/{keras_model.model_id}"] and predicted == [(1, 32, 32, 3)]
    assert networks.LOGGING == {}  # only while logging
    monkeypatch.undo()  # loading it now reads it from the store, as a server does
    classifier = mlflow.pyfunc.load_model(f"models:/{logged['image_classifier']['model_id']}")
    assert classifier.input_example is not None


def test_served_model_hands_back_the_memory_of_large_images(tmp_path, store):
    """8 requests at once of a 49-Mpx photo, each in a thread of its own as the scoring server runs
    them: the decoded copies (gigabytes) must not stay with the process (3.9 GiB more after, before)."""
    mlflow.set_tracking_uri(store[0])
    classifier = mlflow.pyfunc.load_model("models:/tiny@candidate")
    grid = np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8)
    photo = io.BytesIO()
    Image.fromarray(grid).resize((7000, 7000), Image.Resampling.BICUBIC).save(photo, "JPEG", quality=90)
    request = pd.DataFrame({"image": [photo.getvalue()]})
    classifier.predict(request)  # the first large image: what TensorFlow keeps for good is in `before`
    before = psutil.Process().memory_info().rss
    threads = [threading.Thread(target=classifier.predict, args=(request,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert psutil.Process().memory_info().rss - before < 2**30


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
    with pytest.raises(
        UserError,
        match=rf"^--model models:/tiny/1 is not a Keras model \(flavors: "
        rf"python_function\); use the run's Keras model, runs:/{run_id}/model$",
    ):
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


def test_model_input_is_the_central_square_scaled_down_with_antialiasing(tmp_path):
    thirds = np.zeros((100, 300, 3), dtype=np.uint8)
    thirds[:, :100, 0] = thirds[:, 100:200, 1] = thirds[:, 200:, 2] = 255  # red | green | blue
    Image.fromarray(thirds).save(tmp_path / "thirds.png")
    square = model_input(tmp_path / "thirds.png", 20)
    assert square.shape == (20, 20, 3) and square.dtype == np.uint8
    assert np.abs(square[:, 1:-1].astype(int) - [0, 255, 0]).max() <= 2  # the middle third only
    Image.fromarray(np.rot90(thirds).copy()).save(tmp_path / "tall.png")
    assert np.abs(model_input(tmp_path / "tall.png", 20)[1:-1].astype(int) - [0, 255, 0]).max() <= 2

    # One-pixel stripes: an antialiased 9.4x reduction is their mean; sampling without it (the model's
    # in-graph bilinear resize) lands on whole stripes.
    stripes = np.zeros((600, 600, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    assert np.abs(model_input(tmp_path / "stripes.png", 64)[:, 1:-1].astype(int) - 127.5).max() <= 4
    import keras

    aliased = keras.layers.Resizing(64, 64, crop_to_aspect_ratio=True)(stripes[np.newaxis]).numpy()
    assert np.abs(aliased - 127.5).max() > 100

    # An image at the size already is left exactly as it is, by model_input and by the model's resize layer.
    exact = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "exact.png")
    assert (model_input(tmp_path / "exact.png", 32) == exact).all()
    assert (keras.layers.Resizing(32, 32, crop_to_aspect_ratio=True)(exact[np.newaxis]).numpy()[0] == exact).all()


def test_a_fifo_is_skipped_not_read_forever(tmp_path):
    import os

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # opening it for reading would block until someone writes
    assert list(predict.image_files([fifo, tmp_path / "missing.jpg"])) == [
        (fifo, "not a regular file (a FIFO, socket or device)"),
        (tmp_path / "missing.jpg", "no such file or folder"),
    ]


@pytest.mark.slow
def test_imagenet_shows_what_the_pretrained_backbone_sees(tmp_path, monkeypatch, capsys):
    """--imagenet: MobileNet 0.25 with its own ImageNet classifier (real weights) puts class 985,
    "daisy", in the top 5 of most daisy photos; a file without the classifier is one line."""
    archive, with_top = (
        SHARED / "datasets" / "flower_photos.tgz",
        SHARED / "weights" / "mobilenet_0.25_224_imagenet_with_top.h5",
    )
    require_shared(archive)
    require_shared(with_top)
    with tarfile.open(archive) as tar:
        daisies = [m for m in tar.getmembers() if m.name.startswith("flower_photos/daisy/")][:10]
        tar.extractall(tmp_path, members=daisies, filter="data")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] |= {"backbone": "mobilenet", "alpha": 0.25}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # no class index cached: names or numbers, both fine
    predict.main([str(tmp_path / "flower_photos" / "daisy"), "--imagenet", str(with_top), "--top-k", "5", "--json"])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == 10
    top5 = [{p["label"] for p in a["predictions"]} for a in answers]
    assert sum(bool({"daisy", "class 985"} & labels) for labels in top5) >= 7, top5

    no_top = SHARED / "weights" / "mobilenet_0.25_224_imagenet_no_top.h5"
    with pytest.raises(UserError, match="--imagenet: .* it needs weights saved with the top"):
        predict.main([str(tmp_path / "flower_photos" / "daisy"), "--imagenet", str(no_top)])
