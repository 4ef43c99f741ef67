"""The smallest problem, for real: one `dvc repro` on two classes whose names MLflow cannot take as
metric keys, then the metrics, the MLflow run, the predict CLI and a model server."""

import json
import struct
import zlib
from pathlib import Path

import mlflow
import pytest
import requests
import yaml

from conftest import SMALL_BACKBONE, image_request, make_images, model_server, new_project, run, set_params, stages_run
from pipeline.report.tracking import CLASS_KEYS_ARTIFACT, class_keys
from pipeline.tools import predict

# A comma, an apostrophe, quotes and letters outside ASCII: none may appear in an MLflow metric key.
CLASSES = {"Ünïcode, cats": 10, 'dogs\' "best"': 10}
MODEL_NAME = "two-classes"
PLOTS = {
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "reliability.png",
    "training_curves.png",
    "top_losses.png",
    "gradcam.png",
}


pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> tuple[Path, str, Path]:
    """(project, output of `dvc repro`, the class folders), with top_k 5 asked of 2 classes."""
    tmp = tmp_path_factory.mktemp("two")
    images = make_images(tmp / "images", CLASSES, size=(40, 32))
    project = new_project(tmp / "project", images)
    set_params(
        project,
        **SMALL_BACKBONE,
        **{
            "train.epochs": 1,
            "augment.copies": 0,
            "evaluate.top_k": 5,
            "export.tflite": [],
            "mlflow.registered_model_name": MODEL_NAME,
        },
    )
    return project, run(["dvc", "repro"], project).stdout, images


def a_jpeg(images: Path) -> Path:
    return next((images / next(iter(CLASSES))).glob("*.jpg"))


def test_every_stage_runs_and_metrics_name_the_classes_with_top_k_capped(two_classes):
    project, output, _ = two_classes
    assert set(stages_run(output)) == set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert "evaluate.top_k 5 is more than the 2 classes; reporting top_2_accuracy" in output
    metrics = json.loads((project / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["per_class"]) == set(CLASSES)
    assert metrics["top_k"] == 2 and metrics["top_2_accuracy"] == 1.0  # both classes: always among the top 2
    assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["test_images"] == 4
    assert PLOTS <= {p.name for p in (project / "eval" / "plots").iterdir()}


def test_mlflow_run_logs_each_class_under_a_valid_key(two_classes):
    project, _, _ = two_classes
    metrics = json.loads((project / "eval" / "metrics.json").read_text(encoding="utf-8"))
    labels = json.loads((project / "data" / "model" / "labels.json").read_text(encoding="utf-8"))
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run_id = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())["run_id"]
    data = mlflow.MlflowClient().get_run(run_id).data
    logged = data.metrics
    keys = class_keys(labels)
    assert all(key != label for key, label in zip(keys, labels, strict=True))  # both names had to change
    for key, label in zip(keys, labels, strict=True):
        for name, value in metrics["per_class"][label].items():
            if name != "support":  # a count: in metrics.json only
                assert logged[f"test_per_class_{key}_{name}"] == value
    assert data.tags["test_top_k"] == "2" and "test_top_k" not in logged
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/{CLASS_KEYS_ARTIFACT}") == dict(zip(keys, labels, strict=True))


def test_predict_caps_top_k_at_the_two_classes(two_classes, capsys):
    project, _, images = two_classes
    model = project / "data" / "model" / "model.keras"
    predict.main([str(a_jpeg(images)), "--model", str(model), "--top-k", "5", "--json"])
    captured = capsys.readouterr()
    ranked = json.loads(captured.out)["predictions"]
    assert sorted(p["label"] for p in ranked) == sorted(CLASSES)
    assert "note: --top-k 5 is more than the model's 2 classes" in captured.err


def test_served_champion_answers_with_the_two_labels_and_refuses_bad_requests_with_one_line(two_classes):
    project, _, images = two_classes
    image = a_jpeg(images).read_bytes()
    with model_server(project) as url:  # make serve's default: models:/two-classes@champion

        def ask(*images: bytes, **params) -> requests.Response:
            return requests.post(f"{url}/invocations", json=image_request(list(images), **params), timeout=60)

        answer = ask(image, top_k=5)
        refused = {
            "top_k=0": ask(image, top_k=0),
            "top_k=-2": ask(image, top_k=-2),
            "text": ask(image, b"not an image"),
            "81 Mpx": ask(huge_png_header(9000, 9000)),
            "cut off": ask(image[: len(image) // 2]),
        }
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"][0]
    assert served["label"] in CLASSES
    assert sorted(p["label"] for p in served["top_k"]) == sorted(CLASSES)  # 5 asked, 2 exist
    for response in refused.values():
        assert response.status_code == 400, response.text
        assert "stack_trace" not in response.json() and "Traceback" not in response.text
        assert "\n" not in response.json()["message"] and "JFIF" not in response.text  # none of the request's bytes
    message = {case: response.json()["message"] for case, response in refused.items()}
    assert message["top_k=0"] == "params.top_k must be 1 or more (got 0)"
    assert message["top_k=-2"] == "params.top_k must be 1 or more (got -2)"
    assert message["text"] == (
        "image 1 is not in a format this model reads (JPEG, PNG, GIF, BMP, WEBP, TIFF): "
        "send the image file's bytes, base64-encoded in JSON"
    )
    assert message["81 Mpx"] == (
        "image 0 is 9000x9000 pixels (81.0 megapixels); this server decodes at most 50 "
        "megapixels per image: send it smaller"
    )
    assert message["cut off"].startswith("image 0 cannot be decoded (OSError: ")


def huge_png_header(width: int, height: int) -> bytes:
    """The start of a PNG claiming ``width`` x ``height`` pixels (53 bytes): its header and the
    start of its pixel data, all Pillow reads before decoding, as the server does."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b""))
    )


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
