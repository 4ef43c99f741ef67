"""Every file and folder the stages hand to each other: the one home of these paths and names."""

from pathlib import Path

# Every location a stage writes, the one home of these paths: stages, benches and tests import them,
# and tests/test_dvc_deps.py checks that they are exactly the outs and metrics of dvc.yaml.
RAW_DIR = Path("data/raw")  # download: one folder per class, as in the source
DOWNLOAD_REPORT = Path("reports/download.json")  # download: source (redacted), sha256, skipped entries
PREPARED_DIR = Path("data/prepared")  # prepare: normalized images, manifest, labels, quarantine/ignored/duplicates
DATA_REPORT = Path("reports/data.json")  # prepare: counts (DVC metrics)
AUGMENTED_DIR = Path("data/augmented")  # augment: resized originals and offline variants, manifest
AUGMENT_GALLERY = Path("reports/augment_gallery.png")  # augment: preview of the policy
FEATURES_DIR = Path("data/features")  # features: the feature store (pipeline/model/feature_store.py)
LABEL_ISSUES_REPORT = Path("reports/label_issues.csv")  # label_issues: likely mislabelled images, ranked
LABEL_ISSUES_GALLERY = Path("reports/label_issues.png")  # label_issues: the top suspects
MODEL_DIR = Path("data/model")  # train: model.keras, after_backbone.keras, labels.json, mlflow_run.json
CHECKPOINT_DIR = Path("data/checkpoints")  # train: per-epoch state of an unfinished run (not a DVC output)
# Small results kept in Git (cache: false), so `dvc plots diff` and `dvc metrics diff` compare revisions without
# the DVC cache: evaluate's metrics.json, predictions.csv, plots/; train's history.csv; export's export.json.
EVAL_DIR = Path("eval")
METRICS = EVAL_DIR / "metrics.json"
PREDICTIONS = EVAL_DIR / "predictions.csv"
PLOTS_DIR = EVAL_DIR / "plots"
TEST_PROBABILITIES = Path("data/test_probabilities.npz")  # evaluate: the Keras model's output on each test image
EXPORT_DIR = Path("data/export")  # export: SavedModel, TFLite files, labels.json
EXPORT_REPORT = EVAL_DIR / "export.json"  # export: parity metrics
HISTORY = EVAL_DIR / "history.csv"  # train: one row per epoch (phase, epoch, seconds, metrics): the training curves
# Files inside those folders that other stages read.
PREPARED_MANIFEST = PREPARED_DIR / "manifest.csv"
PREPARED_LABELS = PREPARED_DIR / "labels.json"
AUGMENTED_MANIFEST = AUGMENTED_DIR / "manifest.csv"
MODEL_FILE = MODEL_DIR / "model.keras"
AFTER_BACKBONE_FILE = MODEL_DIR / "after_backbone.keras"  # MODEL_FILE's pooling and head (networks.after_backbone)
MODEL_LABELS = MODEL_DIR / "labels.json"
MLFLOW_RUN_FILE = MODEL_DIR / "mlflow_run.json"  # the MLflow run that made the model (train writes, evaluate reopens)
# The folders stages write into (temporaries of a killed stage are left there: files.sweep_outputs).
OUTPUT_FOLDERS = tuple(
    sorted(
        {
            path.parent
            for path in (
                RAW_DIR,
                DOWNLOAD_REPORT,
                PREPARED_DIR,
                DATA_REPORT,
                AUGMENTED_DIR,
                AUGMENT_GALLERY,
                FEATURES_DIR,
                LABEL_ISSUES_REPORT,
                LABEL_ISSUES_GALLERY,
                MODEL_DIR,
                METRICS,
                PREDICTIONS,
                PLOTS_DIR,
                TEST_PROBABILITIES,
                EXPORT_DIR,
                EXPORT_REPORT,
                HISTORY,
                MLFLOW_RUN_FILE,
            )
        }
    )
)
# The data.labels table as the download stage copies it: paths relative to RAW_DIR; hidden, so never an image.
LABELS_TABLE = RAW_DIR / ".labels.csv"
LABELS_COLUMNS = ("path", "label", "split")  # split is optional
SPLITS = ("train", "val", "test")
# Names (lower case) that mean a split, as top-level folders of a source or in a labels table's split column.
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JPEG_QUALITY = 95  # for the images stages write: high enough that re-encoding costs no accuracy
# Not a DVC output: each stage's last wall time, for the summary (DVC's own tmp folder, git-ignored).
STAGE_TIMES = Path(".dvc/tmp/stage_times.json")
# Not a DVC output: `dvc plots show`'s page template with the Vega libraries inside (pipeline/tools/plots_page.py;
# .dvc/config's plots.html_template names it, relative to .dvc/); make setup writes it.
PLOTS_PAGE = Path(".dvc/tmp/plots_page.html")
REPORT = EVAL_DIR / "report.html"  # evaluate: the run's one-page report (pipeline/report/html.py)
