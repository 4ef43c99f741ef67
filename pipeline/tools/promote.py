"""`make promote EXP=<name>`: ship a DVC experiment's model: the workspace's model and the served one, in one step.

``dvc exp apply <name>`` puts the experiment's params, ``dvc.lock`` and outputs (``data/model``
among them, from the DVC cache) in the workspace; then ``@champion``, the alias ``make serve``
serves, moves to the registered versions that ``data/model/mlflow_run.json`` names: those that
very model was logged as. So ``data/model`` and the served model are one model, whatever evaluate
decided when the experiment ran. Without a name, the workspace's model as it is (e.g. after a
``dvc repro`` whose versions stayed ``@candidate``).
Usage: python -m pipeline.tools.promote [EXPERIMENT]
"""

import argparse
import subprocess

import mlflow

from pipeline.cli import UserError, error_summary, run_stage
from pipeline.paths import MLFLOW_RUN_FILE, MODEL_DIR
from pipeline.report import tracking


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], capture_output=True, text=True, check=False)


def dvc_error(result: subprocess.CompletedProcess) -> str:
    """DVC's own message: its first ``ERROR:`` line (else its last line)."""
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return next(
        (line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR")), lines[-1] if lines else ""
    )


def apply(name: str) -> None:
    """``dvc exp apply name``, refusing a name that is no finished experiment in one line."""
    listed = dvc("exp", "list", "--all-commits", "--name-only")
    if listed.returncode != 0:
        raise UserError(f"dvc exp list failed: {dvc_error(listed)}")
    if name not in listed.stdout.split():
        raise UserError(
            f"no DVC experiment named '{name}': `dvc exp list --all-commits` lists them "
            "(a queued one must have run: dvc queue status)"
        )
    applied = dvc("exp", "apply", name)
    if applied.returncode != 0:
        raise UserError(
            f"dvc exp apply {name} failed: {dvc_error(applied)} "
            "(outputs of an experiment run elsewhere: dvc exp pull <remote> first)"
        )


def promote_workspace_model() -> list[str]:
    """Point @champion at the versions of the model in data/model; their URIs."""
    if not MLFLOW_RUN_FILE.is_file():
        raise UserError(
            f"{MLFLOW_RUN_FILE} is missing: there is no trained model in {MODEL_DIR} (dvc repro, or dvc pull)"
        )
    recorded = tracking.recorded_run()
    if tracking.servable(recorded) is None:
        raise UserError(
            f"the model in {MODEL_DIR} was not registered (mlflow.register_model was false): "
            "there is no version to promote"
        )
    store = tracking.use_project_store()
    try:
        return tracking.promote(recorded)
    except mlflow.exceptions.MlflowException as err:
        raise UserError(
            f"the MLflow store {store} lacks the versions of the model in {MODEL_DIR} (it was "
            f"logged to {recorded['tracking_uri']}): set MLFLOW_TRACKING_URI to that store "
            f"({error_summary(err)[:150]})"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.promote", description=__doc__.splitlines()[0])
    parser.add_argument(
        "experiment", nargs="?", help="a DVC experiment's name (dvc exp show); none: the model in the workspace"
    )
    args = parser.parse_args(argv)
    if args.experiment:
        apply(args.experiment)
    promoted = promote_workspace_model()
    source = f"experiment {args.experiment}, now in the workspace" if args.experiment else "the workspace's model"
    print(f"promote: @champion is now {', '.join(promoted)} ({source}: {MODEL_DIR}); make serve serves it")


if __name__ == "__main__":
    run_stage(main)
