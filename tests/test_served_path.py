"""What evaluate reports is what a user gets: the test split's original files, of every awkward kind,
sent to the model server (`make serve`, for real) and to `python -m pipeline.tools.predict`, give
evaluate's probabilities (data/test_probabilities.npz) and so its accuracy."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import image_request, model_server, new_project, run, set_params

pytestmark = pytest.mark.e2e  # whole pipelines: out of make test-fast

CLASSES = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
# A model whose answers move with the pixels, so that any difference in how a file becomes its input
# shows: MobileNetV2 0.35 at 32 px (0.4 M weights) with random weights, its head trained hard. Not
# conftest.SMALL_BACKBONE: random MobileNet v1 features vanish (~1e-17), a constant model that would
# hide any difference. With the pipeline before evaluate scored the original files, this run differed
# by up to 0.029 (served vs reported), so the test fails there.
SENSITIVE_MODEL = {
    "model.backbone": "mobilenet_v2",
    "model.alpha": 0.35,
    "model.image_size": 32,
    "train.epochs": 30,
    "train.learning_rate": 0.05,
    "train.early_stopping_patience": None,
}
TRAINING_SIZE = (64, 48)
TOLERANCE = 0.01  # largest probability difference allowed (the same arithmetic, batched differently: ~1e-6)


def photo(colour: tuple[int, int, int], seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like picture of ``size``: the class colour under smooth random shapes and grain."""
    rng = np.random.default_rng(seed)
    shapes = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = 0.6 * np.array(colour) + 0.4 * np.asarray(shapes) + rng.normal(0, 10, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_test_photos(folder: Path, seed: int) -> list[str]:
    """The awkward test files, one kind per file, spread over the classes; their names."""
    red, green, blue = (folder / label for label in CLASSES)
    photo(CLASSES["red"], seed, (2400, 1800)).save(red / "camera_2400px.jpg", quality=90)
    photo(CLASSES["red"], seed + 1, (8 * TRAINING_SIZE[0], 8 * TRAINING_SIZE[1])).save(red / "eight_times.jpg")
    exif = Image.Exif()
    for orientation in (6, 8):  # stored on its side; shown upright after a quarter turn one way or the other
        exif[0x0112] = orientation
        photo(CLASSES["green"], seed + orientation, (300, 200)).save(green / f"exif_{orientation}.jpg", exif=exif)
    photo(CLASSES["blue"], seed + 2, (200, 150)).convert("CMYK").save(blue / "cmyk.jpg", quality=95)
    rgba = photo(CLASSES["blue"], seed + 3, (120, 160)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # transparent at the top, opaque at the bottom
    rgba.save(blue / "alpha.png")
    return [
        "red/camera_2400px.jpg",
        "red/eight_times.jpg",
        "green/exif_6.jpg",
        "green/exif_8.jpg",
        "blue/cmyk.jpg",
        "blue/alpha.png",
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """(project after `dvc repro`, its test files, evaluate's probabilities by file and labels)."""
    tmp = tmp_path_factory.mktemp("served")
    images, seed = tmp / "images", 0
    for split, count in (("train", 8), ("val", 2), ("test", 1)):
        for label, colour in CLASSES.items():
            (images / split / label).mkdir(parents=True)
            for i in range(count):
                seed += 1
                photo(colour, seed, TRAINING_SIZE).save(images / split / label / f"{i}.jpg", quality=95)
    awkward = write_test_photos(images / "test", 1000)
    project = new_project(tmp / "project", images)
    set_params(project, **SENSITIVE_MODEL, **{"augment.copies": 0, "export.tflite": []})
    run(["dvc", "repro"], project)

    with np.load(project / "data" / "test_probabilities.npz") as saved:
        recorded = dict(zip(saved["paths"].tolist(), saved["probabilities"], strict=True))
    files = sorted(f"data/raw/test/{name}" for name in [*awkward, *(f"{label}/0.jpg" for label in CLASSES)])
    assert sorted(recorded) == files, "evaluate's probabilities are not keyed by the test split's original files"
    labels = json.loads((project / "data" / "model" / "labels.json").read_text())
    return project, files, {"probabilities": recorded, "labels": labels}


def assert_same_answers(answers: dict[str, np.ndarray], evaluated: dict) -> None:
    """Every file's probabilities within TOLERANCE of evaluate's, and the same most probable class."""
    for path, probabilities in answers.items():
        expected = evaluated["probabilities"][path]
        assert np.abs(probabilities - expected).max() <= TOLERANCE, (path, probabilities, expected)
        assert probabilities.argmax() == expected.argmax(), path


def by_label(ranked: list[dict], labels: list[str]) -> np.ndarray:
    probability = {p["label"]: p["probability"] for p in ranked}
    return np.array([probability[label] for label in labels])


def test_the_model_server_answers_what_evaluate_reported(evaluated):
    project, files, recorded = evaluated
    with model_server(project) as url:  # make serve: the registered model's @champion
        response = requests.post(
            f"{url}/invocations",
            timeout=120,
            json=image_request([(project / path).read_bytes() for path in files], top_k=len(recorded["labels"])),
        )
    assert response.status_code == 200, response.text
    served = {
        path: by_label(answer["top_k"], recorded["labels"])
        for path, answer in zip(files, response.json()["predictions"], strict=True)
    }
    assert_same_answers(served, recorded)
    metrics = json.loads((project / "eval" / "metrics.json").read_text())
    truth = [recorded["labels"].index(Path(path).parent.name) for path in files]
    assert np.mean([served[path].argmax() == t for path, t in zip(files, truth)]) == pytest.approx(
        metrics["accuracy"], abs=1e-4
    )


def test_predict_answers_what_evaluate_reported(evaluated):
    project, files, recorded = evaluated
    printed = run(
        [sys.executable, "-m", "pipeline.tools.predict", *files, "--json", "--top-k", str(len(recorded["labels"]))],
        project,
    ).stdout
    answers = [json.loads(line) for line in printed.splitlines()]
    assert [answer["path"] for answer in answers] == files
    assert_same_answers({a["path"]: by_label(a["predictions"], recorded["labels"]) for a in answers}, recorded)
