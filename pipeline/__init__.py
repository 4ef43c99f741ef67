"""Transfer-learning pipeline for image classification.

Each stage is a module runnable as ``python -m pipeline.<stage>``; stages talk only through
files under ``data/`` and the validated config built from ``params.yaml``.
"""

import os

# Keras 3 runs on TensorFlow unless the user chose another backend; keep TF's C++ log quiet.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
