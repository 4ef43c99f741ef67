"""Commands around the pipeline, not DVC stages: ``predict`` (the served model on your files),
``compare`` (experiments side by side), ``summary`` (the end-of-run report ``make run`` prints),
``params_doc`` (docs/params.md from the params schema), ``promote`` (an experiment's model into the
workspace and to ``@champion``), ``experiments`` (``make exp``'s grid), ``make_args`` (make variables
into commands, without a shell).

Importing this package quiets TensorFlow's start-up log, as ``pipeline.stages`` does."""

from pipeline.cli import quiet_tensorflow_import

quiet_tensorflow_import()  # as for the stages: a tool's output is not TensorFlow's start-up log
