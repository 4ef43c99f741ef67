"""Transfer-learning pipeline for image classification.

Layout (each sub-package's docstring says more):

- ``pipeline.stages``: the DVC stages, one module each (``python -m pipeline.stages.<stage>``);
- ``pipeline.tools``: predict, compare, summary (commands around the pipeline);
- ``pipeline.data``: photo -> model input, augmentation, manifests; ``pipeline.sources``: getting
  the user's files (fetch, archives, folders, layouts, dedupe, splits);
- ``pipeline.model``: backbones, networks, devices, feature store, checkpoints;
- ``pipeline.report``: metrics, plots, Grad-CAM, MLflow tracking; ``pipeline.serving``: the served model;
- ``pipeline.config`` (every param), ``pipeline.paths`` (every file a stage writes), ``pipeline.cli``
  (how a stage process starts and ends), ``pipeline.warm`` (warm workers, ``make warm``),
  ``pipeline.files`` (atomic writes).

Stages talk only through files under ``data/`` and the validated config built from ``params.yaml``.
"""

import os

# Keras 3 runs on TensorFlow unless the user chose another backend.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's C++ log: warnings and errors, not INFO (0 shows INFO too, 2 only errors).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# MLflow's own log: warnings, not its INFO notes (database set-up, input-example checks, system metrics).
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# ... and no progress bars when we copy a model out of its store (predict --model models:/...).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
