"""The DVC stages, one module each, in pipeline order: download, prepare, augment, features,
label_issues, train, evaluate, export. Each runs as ``python -m pipeline.stages.<stage>`` (the
``cmd`` of its ``dvc.yaml`` stage), reads only ``params.yaml`` and the files of earlier stages, and
writes only its own outputs (``pipeline/paths.py``). ``--help`` prints what a stage reads and writes.

Importing this package (a stage process, not serving or the tools) first hands the stage to the
project's warm worker when ``make warm`` started one (``pipeline.warm``: the process then exits
here, with the stage's exit status), and otherwise quiets TensorFlow's start-up log
(``pipeline.cli.quiet_tensorflow_import``).
"""

from pipeline.cli import quiet_tensorflow_import
from pipeline.warm import hand_over_stage

hand_over_stage()
quiet_tensorflow_import()
