"""The MLflow UI's page of an experiment's runs, as `make ui` and the run's summary link to it: the
runs table in the UI's model-training view, opened on the saved view "Test scores", which shows
``test_accuracy``, ``test_macro_f1`` and ``test_ece`` as columns, best accuracy first. The table
shows no metric columns by default, and no server or experiment setting changes that; the UI
keeps each browser's own columns in the browser.

A saved view is what the UI's "Views" menu saves: an experiment tag
``mlflow.sharedViewState.<key>`` holding the view's name, time and state (the table's sort and
columns), which a link with ``viewStateShareKey=<key>`` opens (MLflow 3.17, savedViewEnvelope.ts
and useSharedExperimentViewState.ts). ``tracking.start_new_run`` gives each experiment this one.
Knows no MLflow API, so the summary links to the page without loading MLflow.
"""

import json
import time

# MLflow 3.17's UI still picks its pages by the browser's own "GenAI / Model training" switch (GenAI
# until changed), not by the experiment's kind tag (mlflow/mlflow#24498): links to the runs page say which to show.
TRAINING_VIEW = "workflowType=machine_learning"
VIEW_KEY = "test-scores"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "Test scores"
SCORE_COLUMNS = ("test_accuracy", "test_macro_f1", "test_ece")  # tracking.log_test_metrics' names


def column(kind: str, name: str) -> str:
    """A column of the runs table as the UI names it: ``metrics.`test_accuracy```."""
    return f"{kind}.`{name}`"


def view_tag_value() -> str:
    """The saved view, as the UI writes it: a JSON envelope around the view's state, itself JSON."""
    state = {
        "orderByKey": column("metrics", SCORE_COLUMNS[0]),
        "orderByAsc": False,
        "selectedColumns": [column("attributes", "Dataset"), *(column("metrics", name) for name in SCORE_COLUMNS)],
    }
    return json.dumps({"name": VIEW_NAME, "createdAt": int(time.time() * 1000), "state": json.dumps(state)})


def runs_url(ui_url: str, experiment_id: str | None, saved_view: bool = True) -> str:
    """The experiment's runs (on the saved view, unless ``saved_view`` is False: an experiment
    without the tag), or the list of experiments when there is no experiment yet."""
    if experiment_id is None:
        page = f"experiments?{TRAINING_VIEW}"
    else:
        page = f"experiments/{experiment_id}/runs?{TRAINING_VIEW}"
        if saved_view:
            page += f"&viewStateShareKey={VIEW_KEY}"
    return f"{ui_url.rstrip('/')}/#/{page}"
