"""The servable MLflow model: image bytes in, top labels out.

The train stage logs this file itself as the model ``image_classifier`` (MLflow's models from code:
no pickled object), with the ``pipeline`` package beside it (``code_paths``). It holds no weights:
its model config names the Keras model logged in the same run (``models:/m-<id>``) and the class
names, so a run stores the weights once; loading it reads that Keras model from the tracking store
(``MLFLOW_TRACKING_URI``, which ``make serve`` sets). With ``mlflow models serve`` a client posts
JPEG or PNG files base64-encoded (MLflow's scoring server takes JSON, CSV or Parquet bodies, not
raw image bytes), e.g. with curl::

    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": [[\\"$(base64 -w0 rose.jpg)\\"]]}}"

and gets, per image, the best label, its probability, and ``top_k``: a list of the ``top_k`` (a
param, default 3; more than the number of classes gives all of them) best labels with their
probabilities. Each image becomes the model's input through ``request_image_input``
(pipeline/data/images.py ``model_input``: upright sRGB, central square at the model's input size):
the evaluate stage scores the test split's original files through that same function, so the
reported test metrics are the ones this model gives. A request the model cannot answer (``top_k``
below 1, a file that is not an image, an image over ``MAX_MEGAPIXELS``) is answered with HTTP 400
and a one-line message naming the image and why, none of the request's data; any other failure with
HTTP 500, its traceback only in
the server's log.
"""

import base64
import contextlib
import ctypes
import io
import logging
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property
from PIL import Image

from pipeline.cli import UserError, error_summary
from pipeline.config import MAX_MEGAPIXELS
from pipeline.data.images import FORMATS, model_input
from pipeline.model import networks

DEFAULT_TOP_K = 3  # labels per image unless asked for more or fewer
# One image decoded and predicted at a time per server process, however many requests arrive at
# once: memory is bounded by the largest image, not by the number of concurrent requests.
ONE_IMAGE_AT_A_TIME = threading.Lock()
RANKED = Array(Object([Property("label", "string"), Property("probability", "double")]))
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"), ColSpec(RANKED, "top_k")]),
    params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]),
)
log = logging.getLogger(__name__)


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has malloc_trim), for memory_returned."""
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
        return libc if hasattr(libc, "malloc_trim") else None
    return None


LIBC = glibc()


def example_request() -> pd.DataFrame:
    """A one-image request (a small grey JPEG): MLflow stores it as the model's input example."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="JPEG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def top_labels(probabilities: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable labels with their probabilities, best first; ties keep label order."""
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [(labels[i], float(probabilities[i])) for i in best]


class ServedError(MlflowException):
    """An MlflowException whose message stays as written: one line. MLflow's scoring server (3.17)
    rewrites the message of any MlflowException raised in predict to ``Failed to predict data
    '<the request's data frame>'. \nError: <message>``, lines echoing the client's bytes back."""

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set by MlflowException.__init__; the server's rewrite is dropped
            self._message = value


class Refused(ServedError):
    """An error the client caused: the scoring server answers HTTP 400 with the message, no traceback."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def request_image_input(data: bytes | str, index: int, size: int) -> np.ndarray:
    """Image ``index`` of a request (its file's bytes, or their base64 text) as the model's input at
    ``size`` pixels (images.model_input); the errors the client caused as ``Refused``."""

    def not_too_large(image: Image.Image) -> None:  # read from the header, before decoding
        width, height = image.size
        if width * height > MAX_MEGAPIXELS * 1_000_000:
            raise Refused(
                f"image {index} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
                f"this server decodes at most {MAX_MEGAPIXELS} megapixels per image: send it smaller"
            )

    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else data
        return model_input(io.BytesIO(raw), size, not_too_large)
    except Refused:
        raise
    except Image.UnidentifiedImageError:
        raise Refused(
            f"image {index} is not in a format this model reads ({', '.join(FORMATS)}): send the "
            "image file's bytes, base64-encoded in JSON"
        ) from None
    except Exception as err:  # bad base64; Pillow raises many types for damaged files
        raise Refused(f"image {index} cannot be decoded ({error_summary(err)})") from None


def file_input(path: str, index: int, size: int) -> np.ndarray:
    """The file at ``path`` as this server makes it the model's input; a file it would refuse with
    HTTP 400 as a one-line ``UserError`` naming it."""
    try:
        return request_image_input(Path(path).read_bytes(), index, size)
    except Refused as err:
        raise UserError(f"test image {path}: the model server refuses it: {err.message}") from None


def file_batches(paths: list[str], size: int, batch_size: int) -> Iterator[np.ndarray]:
    """The files' model inputs (``file_input``) in batches, decoded in threads (Pillow lets go of the
    GIL while it decodes and resizes) a batch at a time, so memory holds one batch whatever their number."""
    with ThreadPoolExecutor() as pool:
        for start in range(0, len(paths), batch_size):
            indices = range(start, min(start + batch_size, len(paths)))
            yield np.stack(list(pool.map(lambda i: file_input(paths[i], i, size), indices)))


@contextlib.contextmanager
def memory_returned() -> Iterator[None]:
    """Give the memory freed in the block back to the OS (glibc's malloc_trim). The scoring server
    predicts in a pool of threads, glibc keeps what each frees in an arena of its own, and a large
    image's copies (gigabytes) stayed there: 8 concurrent 49-Mpx requests left the server at 5.2 GiB
    (1.1 idle)."""
    try:
        yield
    finally:
        if LIBC is not None:
            LIBC.malloc_trim(0)


def load_keras_model(uri: str):
    """The Keras flavor of the logged model at ``uri``. MLflow copies the model out of the store to
    load it, by default into a folder of the temp dir it never removes (a whole model per load):
    here into one removed once the model is in memory. In the process logging it, the model in memory
    (``networks.logging_as``)."""
    if uri in networks.LOGGING:
        return networks.LOGGING[uri]
    with tempfile.TemporaryDirectory(prefix="keras-model-") as scratch:
        return mlflow.keras.load_model(uri, dst_path=scratch)


class ImageClassifier(PythonModel):
    def load_context(self, context):
        self.model = load_keras_model(context.model_config["keras_model"])
        self.labels = context.model_config["labels"]
        self.size = networks.input_size(self.model)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        if top_k < 1:
            raise Refused(f"params.top_k must be 1 or more (got {top_k})")
        rows = [self.classify(data, index, top_k) for index, data in enumerate(model_input["image"])]
        return pd.DataFrame(rows, columns=["label", "probability", "top_k"])

    def classify(self, data: bytes | str, index: int, top_k: int) -> dict:
        with ONE_IMAGE_AT_A_TIME, memory_returned():
            pixels = request_image_input(data, index, self.size)
            try:
                # One batch needs no tf.data pipeline (predict builds one per call: under train's op determinism
                # TF rewrites its parallel map and logs a false E0000 "use_unbounded_threadpool" error).
                probabilities = self.model.predict_on_batch(pixels[np.newaxis])[0]
            except Exception as err:  # the scoring server would send the traceback to the client
                log.exception("image %d: the prediction failed", index)
                raise ServedError(
                    f"image {index}: the prediction failed ({type(err).__name__}); the server's log has the details",
                    error_code=INTERNAL_ERROR,
                ) from None
        ranked = [
            {"label": label, "probability": round(p, 6)} for label, p in top_labels(probabilities, self.labels, top_k)
        ]  # at most every class
        return {"label": ranked[0]["label"], "probability": ranked[0]["probability"], "top_k": ranked}


mlflow.models.set_model(ImageClassifier())  # what MLflow loads from this file
