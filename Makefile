# Quick start: `make run` (sets itself up, then runs the whole pipeline) and `make test`.
# Override params for one run without editing params.yaml:
#   make run SET="data.url=/path/to/flower_photos.tgz model.weights=none data.max_per_class=50"

PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
SET ?=
MLFLOW_PORT ?= 5000
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup setup-gpu run test ui clean lock

setup: $(STAMP)

# The environment is rebuilt whenever the lock file or pyproject.toml change.
$(STAMP): requirements.lock pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	touch $@

# On a machine with an NVIDIA GPU: the same TensorFlow version, built with CUDA.
TF_VERSION := $(shell sed -n 's/^tensorflow-cpu==//p' requirements.lock)
setup-gpu: setup
	$(BIN)/pip uninstall --quiet -y tensorflow-cpu
	$(BIN)/pip install --quiet "tensorflow[and-cuda]==$(TF_VERSION)"

run: setup
ifeq ($(strip $(SET)),)
	dvc repro
else
	dvc exp run $(foreach s,$(SET),-S $(s))
endif
	dvc metrics show

test: setup
	pytest

ui: setup
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port $(MLFLOW_PORT)

# Regenerate requirements.lock from pyproject.toml (needs network).
lock:
	$(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv pip compile --python-version 3.11 --extra test pyproject.toml -o requirements.lock

clean:
	rm -rf data/raw data/prepared data/augmented data/features data/model eval reports
	rm -rf .pytest_cache
