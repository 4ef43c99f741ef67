"""Resuming a killed training run exactly where it stopped.

The train stage saves its whole state after every epoch into ``data/checkpoints/``. That folder is
not a DVC output on purpose: DVC deletes a stage's outputs before running it, which would throw the
checkpoints away just when a rerun needs them. It is git-ignored (its own ``.gitignore``), tied to
a key (the training params and the content of the inputs) so that a run with other params or data
starts over, and deleted once training has succeeded.

"Exactly" means: a resumed run ends with the same weights and metrics as an uninterrupted one (CPU,
same seed). Besides the model and optimizer variables (Keras' random-generator states, e.g.
dropout's, are model variables), that needs the history so far, the state of the callbacks that
remember earlier epochs (early stopping's best epoch and weights, the plateau counter), and data
batches that depend on the epoch only (see ``pipeline.stages.train.shuffled_epochs``).

On a cluster (``TF_CONFIG``) only the chief keeps this folder; each other worker gets a copy of it
at the start (:func:`packed`, :func:`unpack`) into a scratch folder it trains with, so that all
resume from the same epoch.
"""

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.files import atomic_file, read_json, write_json
from pipeline.paths import CHECKPOINT_DIR

OWNER_FILE = "owner.json"  # the resume key and the MLflow run that wrote the checkpoints
STATE_FILE = "state.json"

# What a callback remembers across epochs, besides EarlyStopping.best_weights (saved as arrays).
CALLBACK_STATE: dict[type, tuple[str, ...]] = {
    keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
}


def killed_attempt(key: str) -> dict[str, Any] | None:
    """The owner record of an earlier, killed attempt with the same ``key`` (its checkpoints are
    valid to resume from); else None, and the folder is emptied for a fresh start."""
    owner_file = CHECKPOINT_DIR / OWNER_FILE
    previous = read_json(owner_file) if owner_file.is_file() else None
    if previous is not None and previous["key"] == key:
        return previous
    shutil.rmtree(CHECKPOINT_DIR, ignore_errors=True)
    CHECKPOINT_DIR.mkdir(parents=True)
    (CHECKPOINT_DIR / ".gitignore").write_text("*\n", encoding="utf-8")
    return None


def claim(key: str, mlflow_run_id: str) -> None:
    """Record that the MLflow run ``mlflow_run_id`` now writes the checkpoints valid for ``key``."""
    write_json(CHECKPOINT_DIR / OWNER_FILE, {"key": key, "mlflow_run_id": mlflow_run_id})


def remove() -> None:
    shutil.rmtree(CHECKPOINT_DIR, ignore_errors=True)


def packed() -> bytes:
    """The checkpoint folder as an uncompressed tar (its arrays do not compress)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(CHECKPOINT_DIR, arcname=".")
    return buffer.getvalue()


def unpack(tar: bytes, folder: Path) -> None:
    """What :func:`packed` made, into ``folder``."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(folder, filter="data")


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the training state of one phase after every epoch, and puts it back on a rerun.

    Put it after the callbacks listed in ``stateful`` so that it saves their end-of-epoch state.
    Before ``fit``: :meth:`restore_variables` (the model must be compiled), then start ``fit`` at
    :attr:`epochs_done`; the callbacks' state comes back in ``on_train_begin``, after they reset it.
    """

    def __init__(self, phase: str, stateful: list[keras.callbacks.Callback], root: Path = CHECKPOINT_DIR):
        super().__init__()
        self.folder = root / phase
        self.stateful = [c for c in stateful if type(c) in CALLBACK_STATE]
        state_file = self.folder / STATE_FILE
        self.saved: dict[str, Any] | None = read_json(state_file) if state_file.is_file() else None
        self.history: list[dict[str, float]] = list(self.saved["history"]) if self.saved else []

    @property
    def epochs_done(self) -> int | None:
        """Epochs completed by the killed run (numbered across phases), or None when there was none."""
        return self.saved["epoch"] if self.saved else None

    @property
    def stopped(self) -> bool:
        """Whether early stopping had already ended the phase."""
        return bool(self.saved and self.saved["stopped"])

    def restore_variables(self, model: keras.Model) -> None:
        if not self.saved:
            return
        model.optimizer.build(model.trainable_variables)
        with np.load(self.folder / self.saved["arrays"]) as arrays:
            for index, variable in enumerate(_state_variables(model)):
                variable.assign(arrays[f"variable_{index}"])

    def on_train_begin(self, logs=None):
        if not self.saved:
            return
        with np.load(self.folder / self.saved["arrays"]) as arrays:
            for index, (callback, state) in enumerate(zip(self.stateful, self.saved["callbacks"], strict=True)):
                for name, value in state.items():
                    setattr(callback, name, value)
                best = sorted((k for k in arrays.files if k.startswith(f"best_{index}_")), key=_array_number)
                if best:
                    callback.best_weights = [arrays[k] for k in best]

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({"epoch": epoch + 1, **{name: float(value) for name, value in (logs or {}).items()}})
        arrays = {f"variable_{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(_state_variables(self.model))}
        for index, callback in enumerate(self.stateful):
            for i, weights in enumerate(getattr(callback, "best_weights", None) or []):
                arrays[f"best_{index}_{i}"] = weights
        name = f"epoch-{epoch + 1}.npz"
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / name, "wb") as fh:
            np.savez(fh, **arrays)
        write_json(
            self.folder / STATE_FILE,
            {  # written last: it always names a complete arrays file
                "epoch": epoch + 1,
                "stopped": bool(self.model.stop_training),
                "arrays": name,
                "history": self.history,
                "callbacks": [
                    {attr: _plain(getattr(c, attr)) for attr in CALLBACK_STATE[type(c)]} for c in self.stateful
                ],
            },
        )
        for old in self.folder.glob("epoch-*.npz"):
            if old.name != name:
                old.unlink()


def _state_variables(model: keras.Model) -> list:
    return [*model.variables, *model.optimizer.variables]


def _array_number(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _plain(value: Any) -> Any:
    """JSON-ready: callbacks hold numpy scalars (and None, and +-inf, which json writes as Infinity)."""
    if value is None:
        return None
    return int(value) if isinstance(value, int | np.integer) else float(value)
