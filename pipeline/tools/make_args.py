"""What ``make run``, ``predict``, ``serve``, ``ui``, ``exp``, ``compare`` and ``promote`` run, built from
the make variables as they were typed, without a shell.

The Makefile exports each variable unexpanded (``override X := $(value X)``), so neither make
(``$(...)``) nor a shell (`` `...` ``, ``$(...)``, ``;``) ever evaluates what a user typed. Lists are
split here with the shell's quoting rules (``shlex``): ``PATHS="'my photo.jpg' more/"`` is two paths.

    python -m pipeline.tools.make_args run|predict|serve|ui|exp

- ``run``: ``SET`` is ``key=value`` items (``SET="train.epochs=5 data.url='/data/my photos'"``),
  each handed to ``dvc exp run -S``; anything else is refused in one line. Empty: ``dvc repro``.
- ``predict``: ``PATHS`` (at least one) and ``ARGS`` become the arguments of ``pipeline.tools.predict``.
- ``serve``: ``mlflow models serve`` of ``MODEL`` (empty: the registered model's ``@champion``) on ``SERVE_PORT``.
- ``ui``: prints the link to the experiment's runs, then ``mlflow ui`` on ``MLFLOW_PORT``.
- ``exp``: ``EXP_GRID`` (DVC's ``-S a=1,2`` sweep options) handed whole to ``pipeline.tools.experiments``.
- ``compare``: ``ARGS`` become the arguments of ``pipeline.tools.compare``.
- ``promote``: ``EXP`` (an experiment's name) becomes the argument of ``pipeline.tools.promote``.
"""

import os
import re
import shlex
import sys

from pipeline.cli import UserError, run_stage

# A params.yaml key (dotted path of names) = any value: what `dvc exp run -S` takes.
KEY_VALUE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*=.*", re.DOTALL)
USAGE = {
    "SET": "make run SET=\"train.epochs=5 data.url='/data/my photos'\"",
    "PATHS": 'make predict PATHS="photo.jpg \'my photos/\'" [ARGS="--top-k 5 --json"]',
}


def items(name: str) -> list[str]:
    """The make variable ``name`` split like a shell line (quotes group, nothing is evaluated)."""
    try:
        return shlex.split(os.environ.get(name, ""))
    except ValueError as err:  # No closing quotation, No escaped character
        raise UserError(f"{name}: {err}: quote values with spaces as in a shell line{usage(name)}") from None


def usage(name: str) -> str:
    return f", e.g. {USAGE[name]}" if name in USAGE else ""


def port(name: str) -> str:
    value = os.environ.get(name, "")
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise UserError(f"{name}: {value!r} is not a port number (1-65535)")
    return value


def run_command() -> list[str]:
    overrides = items("SET")
    bad = [item for item in overrides if not KEY_VALUE.fullmatch(item)]
    if bad:
        raise UserError(
            f"SET: {bad[0]!r} is not key=value (a params.yaml key, e.g. train.epochs=5); "
            f"quote values with spaces{usage('SET')}"
        )
    if not overrides:
        return ["dvc", "repro"]
    return ["dvc", "exp", "run", *(arg for item in overrides for arg in ("-S", item))]


def predict_command() -> list[str]:
    paths = items("PATHS")
    if not paths:
        raise UserError(f"PATHS names no image file or folder: {USAGE['PATHS']}")
    return [sys.executable, "-m", "pipeline.tools.predict", *paths, *items("ARGS")]


def serve_command() -> list[str]:
    from pipeline.config import load_config

    model = os.environ.get("MODEL") or f"models:/{load_config().registered_model_name}@champion"
    return [
        "mlflow",
        "models",
        "serve",
        "-m",
        model,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        port("SERVE_PORT"),
    ]


def ui_command() -> list[str]:
    from pipeline.config import load_config
    from pipeline.report import tracking

    listening = port("MLFLOW_PORT")
    tracking.use_project_store()
    print(
        f"MLflow UI, this project's runs: "
        f"{tracking.training_runs_url(f'http://127.0.0.1:{listening}', load_config().experiment_name)}",
        flush=True,
    )
    return ["mlflow", "ui", "--backend-store-uri", tracking.tracking_uri(), "--host", "127.0.0.1", "--port", listening]


def exp_command() -> list[str]:
    return [sys.executable, "-m", "pipeline.tools.experiments", "--grid", os.environ.get("EXP_GRID", "")]


def promote_command() -> list[str]:
    return [sys.executable, "-m", "pipeline.tools.promote", *items("EXP")]


def compare_command() -> list[str]:
    return [sys.executable, "-m", "pipeline.tools.compare", *items("ARGS")]


COMMANDS = {
    "run": run_command,
    "predict": predict_command,
    "serve": serve_command,
    "ui": ui_command,
    "exp": exp_command,
    "compare": compare_command,
    "promote": promote_command,
}


def main(argv: list[str] | None = None) -> None:
    target = (sys.argv[1:] if argv is None else argv)[:1]
    if not target or target[0] not in COMMANDS:
        raise UserError(f"usage: python -m pipeline.tools.make_args {'|'.join(COMMANDS)} (what the Makefile runs)")
    command = COMMANDS[target[0]]()
    if target[0] != "predict":  # predict's output is the predictions alone
        print(shlex.join(command), flush=True)
    os.execvp(command[0], command)  # this process becomes the command: its exit status is make's


if __name__ == "__main__":
    run_stage(main)
