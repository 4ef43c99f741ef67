# Quick start: `make run` (sets itself up, then runs the whole pipeline) and `make test`.
# Override params for one run without editing params.yaml (the run becomes a DVC experiment):
#   make run SET="data.url=/path/to/flower_photos.tgz model.weights=none data.max_per_class=50"

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# Every target talks to the same MLflow store as the pipeline (override for a team server).
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
SET ?=
export SET  # the run recipe splits it with the shell's quoting rules
MLFLOW_PORT ?= 5000
SERVE_PORT ?= 5001
# make serve's model; empty = models:/<registered_model_name>@champion (pipeline.config; evaluate moves the alias)
MODEL ?=
PATHS ?=
ARGS ?=
# `make exp` runs one DVC experiment per combination (DVC's -S a=1,2 sweep syntax), then compares them.
EXP_GRID ?= -S model.backbone=inception_v3,resnet50 -S train.fine_tune.blocks=0,2
export EXP_GRID  # handed to Python as it is (no shell evaluates it)
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup setup-gpu run test lint chromium ui serve predict exp compare push pull lock clean bench

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
	@# SET is split like a shell line, so a quoted value may hold spaces: SET="data.url='/data/my photos'"
	@eval "overrides=($$SET)"; args=(); for o in "$${overrides[@]}"; do args+=(-S "$$o"); done; \
	  echo "dvc exp run $${args[*]}"; dvc exp run "$${args[@]}"
endif
	@python -m pipeline.tools.summary

test: setup lint
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || $(MAKE) --no-print-directory chromium
	pytest

# Static checks (ruff: config in pyproject.toml); `make test` runs them first.
lint: setup
	ruff check pipeline tests bench

# The MLflow UI test renders the UI in headless Chromium: Debian's package (needs root).
chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

# Prints the link to the experiment's runs in the UI's model-training view, then serves the UI.
ui: setup
	@echo "MLflow UI, this project's runs: $$(python -m pipeline.report.tracking http://127.0.0.1:$(MLFLOW_PORT))"
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(MLFLOW_PORT)

# Serves the registered model's @champion: POST base64 JPEG/PNG to /invocations (see README).
serve: setup
	mlflow models serve -m "$(or $(MODEL),models:/$$(python -m pipeline.config registered_model_name)@champion)" --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

predict: setup
	@test -n "$(PATHS)" || { echo 'usage: make predict PATHS="photo.jpg folder/" [ARGS="--top-k 5 --json"]' >&2; exit 2; }
	python -m pipeline.tools.predict $(PATHS) $(ARGS)

exp: setup
	python -m pipeline.tools.experiments --grid "$$EXP_GRID"

compare: setup
	python -m pipeline.tools.compare

# Speed benchmarks on a slice of the archive (~15 min on 2 CPU cores), then quality with real
# weights on the whole archive (~45 min more; only with BENCH_WEIGHTS); writes bench/results.md.
# Then appends the warm loop (bench/warm_loop.py, ~5 min) and a 12-experiment sweep on the slice
# (bench/sweep.py, ~30 min), each stage's seconds per 1,000 generated images at 1k, 10k and 100k
# (bench/scaling.py, ~45 min), label_issues' fits at 70,000 images (bench/label_issues_fits.py, ~3 min) and,
# with BENCH_WEIGHTS, memory and disk per run on the whole archive (bench/footprint.py, ~10 min).
#   make bench BENCH_ARCHIVE=/path/to/flower_photos.tgz BENCH_WEIGHTS=/path/to/mobilenet_v2_1.0_224_imagenet_no_top.h5
BENCH_ARCHIVE ?=
BENCH_WEIGHTS ?=
BENCH_PER_CLASS ?= 40
BENCH_ARGS ?= --image-size 299 --epochs 10 --more-epochs 20
bench: setup
	@test -n "$(BENCH_ARCHIVE)" || { echo 'usage: make bench BENCH_ARCHIVE=<flower_photos.tgz> [BENCH_WEIGHTS=<MobileNetV2 no-top .h5>]' >&2; exit 2; }
	python bench/run_all.py --archive $(BENCH_ARCHIVE) --per-class $(BENCH_PER_CLASS) $(if $(BENCH_WEIGHTS),--weights $(BENCH_WEIGHTS)) $(BENCH_ARGS)
	python bench/warm_loop.py --archive $(BENCH_ARCHIVE) --per-class $(BENCH_PER_CLASS) --append bench/results.md
	python bench/sweep.py --archive $(BENCH_ARCHIVE) --per-class $(BENCH_PER_CLASS) --append bench/results.md
	python bench/precision.py --append bench/results.md
	python bench/scaling.py --append bench/results.md
	python bench/label_issues_fits.py --append bench/results.md
	$(if $(BENCH_WEIGHTS),python bench/footprint.py --archive $(BENCH_ARCHIVE) --weights $(BENCH_WEIGHTS) --append bench/results.md)

# Data, features and models to/from the DVC remote you configured (README: "Sharing").
push: setup
	dvc push
pull: setup
	dvc pull

# Regenerate requirements.lock from pyproject.toml (needs the package index).
lock:
	$(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv pip compile --python-version 3.11 --extra test pyproject.toml -o requirements.lock

clean:
	rm -rf data/raw data/prepared data/augmented data/features data/checkpoints data/model data/test_probabilities.npz data/export eval reports
	rm -rf .pytest_cache
