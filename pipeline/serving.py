"""The servable MLflow model: image bytes in, top labels out.

Logged by the train stage as ``image_classifier`` (the ``pipeline`` package travels with the
model through ``code_paths``; this module needs only Keras, Pillow, NumPy and pandas). With ``mlflow models serve`` a
client posts JPEG or PNG files base64-encoded, e.g. with curl::

    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": [[\\"$(base64 -w0 rose.jpg)\\"]]}}"

and gets, per image, the best label, its probability, and the ``top_k`` (a param, default 3;
more than the number of classes gives all of them; below 1 is answered with HTTP 400) labels with
probabilities as a JSON string.
"""

import base64
import io
import json

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline.images import read_rgb

DEFAULT_TOP_K = 3  # labels per image unless asked for more or fewer


def decode_image(data: bytes | str) -> np.ndarray:
    """JPEG/PNG/... bytes (or their base64 text) -> RGB uint8 array, EXIF orientation applied."""
    if isinstance(data, str):
        data = base64.b64decode(data)
    return read_rgb(io.BytesIO(data))


def example_request() -> pd.DataFrame:
    """A one-image request (a small grey JPEG): MLflow stores it as the model's input example."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="JPEG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def top_labels(probabilities: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable labels with their probabilities, best first; ties keep label order."""
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [(labels[i], float(probabilities[i])) for i in best]


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        self.model = keras.saving.load_model(context.artifacts["keras_model"], safe_mode=True)
        with open(context.artifacts["labels"], encoding="utf-8") as fh:
            self.labels = json.load(fh)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        if top_k < 1:  # an MlflowException reaches the client as HTTP 400 with this message
            raise MlflowException.invalid_parameter_value(f"params.top_k must be 1 or more (got {top_k})")
        rows = []
        for data in model_input["image"]:
            # Images differ in size, so each is its own batch; the model resizes internally.
            probabilities = self.model.predict(decode_image(data)[np.newaxis], verbose=0)[0]
            ranked = [{"label": label, "probability": round(p, 6)}
                      for label, p in top_labels(probabilities, self.labels, top_k)]  # at most every class
            rows.append({"label": ranked[0]["label"], "probability": ranked[0]["probability"],
                         "top_k": json.dumps(ranked)})
        return pd.DataFrame(rows, columns=["label", "probability", "top_k"])
