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
MLFLOW_PORT ?= 5000
SERVE_PORT ?= 5001
# make serve's model; empty = models:/<registered_model_name>@champion (pipeline.config; evaluate moves the alias)
MODEL ?=
PATHS ?=
ARGS ?=
# `make exp` runs one DVC experiment per combination (DVC's -S a=1,2 sweep syntax), then compares them.
EXP_GRID ?= -S model.backbone=inception_v3,resnet50 -S train.fine_tune.blocks=0,2
# These reach the commands as typed, never as make or shell code: exported unexpanded, and turned into
# commands by pipeline/tools/make_args.py, which splits lists with the shell's quoting rules but no shell.
USER_VARIABLES := SET MLFLOW_PORT SERVE_PORT MODEL PATHS ARGS EXP_GRID EXP
$(foreach v,$(USER_VARIABLES),$(eval override $(v) := $$(value $(v))))
export $(USER_VARIABLES)
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
# .dvc/config's plots.html_template, relative to .dvc/ (pipeline.paths.PLOTS_PAGE)
PLOTS_PAGE := .dvc/$(shell sed -n 's/^ *html_template *= *//p' .dvc/config)

.PHONY: help setup setup-gpu run test test-fast lint format docs chromium ui serve predict exp compare promote warm cold push pull lock clean bench

## help: this list (each target's `## name: what it does` line)
help:
	@awk '/^## [a-z-]+: /{sub(/^## /, ""); i = index($$0, ": "); printf "  %-10s %s\n", substr($$0, 1, i - 1), substr($$0, i + 2)}' $(MAKEFILE_LIST)

## setup: (re)create .venv from requirements.lock when the lock or pyproject.toml change; dvc plots show's page
setup: $(STAMP) $(PLOTS_PAGE)

# The environment is rebuilt whenever the lock file or pyproject.toml change.
$(STAMP): requirements.lock pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	touch $@

# dvc plots show's page (.dvc/config's plots.html_template): Vega's libraries from the venv inside it, not
# from a CDN, so its charts draw offline. Written again with each new venv.
$(PLOTS_PAGE): $(STAMP)
	python -m pipeline.tools.plots_page

# On a machine with an NVIDIA GPU: the same TensorFlow version, built with CUDA.
TF_VERSION := $(shell sed -n 's/^tensorflow-cpu==//p' requirements.lock)
## setup-gpu: the same, with tensorflow[and-cuda] of the locked version instead of tensorflow-cpu
setup-gpu: setup
	$(BIN)/pip uninstall --quiet -y tensorflow-cpu
	$(BIN)/pip install --quiet "tensorflow[and-cuda]==$(TF_VERSION)"

## run: dvc repro (with SET="key=value ...": dvc exp run -S ...), then the run's summary
# SET is split like a shell line, so a quoted value may hold spaces: SET="data.url='/data/my photos'"
run: setup
	@python -m pipeline.tools.make_args run
	@python -m pipeline.tools.summary

# The test files run in TEST_WORKERS processes (pytest-xdist; --dist loadfile keeps each file's tests,
# and the module fixtures they share, in one process); their folders go under .pytest-tmp, not /tmp.
TEST_WORKERS ?= 2
PYTEST := pytest -n $(TEST_WORKERS) --dist loadfile --basetemp=$(CURDIR)/.pytest-tmp

## test: lint, then the whole test suite (real DVC, MLflow servers, Chromium; no network)
test: setup lint
	@{ command -v chromium || command -v chromium-browser; } >/dev/null && test -f /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc || $(MAKE) --no-print-directory chromium
	$(PYTEST)

# Tests not marked slow or e2e (pyproject.toml registers the markers): a check in a few minutes.
## test-fast: lint, then the tests not marked slow or e2e
test-fast: setup lint
	$(PYTEST) -m "not slow and not e2e"

# Static checks (ruff and mypy: config in pyproject.toml); `make test` runs them first.
## lint: ruff check and mypy
lint: setup
	ruff check pipeline tests bench
	mypy

## format: ruff format (settings in pyproject.toml)
format: setup
	ruff format pipeline tests bench

# The reference site (mkdocs.yml, docs/); tests/test_docs.py builds it with --strict.
## docs: serve the docs site on http://127.0.0.1:8000 while you edit
docs: setup
	mkdocs serve -a 127.0.0.1:8000

# The UI and report tests render pages in headless Chromium; plots draw CJK class names with Noto Sans CJK.
## chromium: install Debian's chromium and fonts-noto-cjk for the browser tests and CJK plots (needs root)
chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk >/dev/null

# Prints the link to the experiment's runs in the UI's model-training view, then serves the UI.
## ui: the MLflow UI on 127.0.0.1:5000 (MLFLOW_PORT), with the link to this project's runs
ui: setup
	@python -m pipeline.tools.make_args ui

# Serves the registered model's @champion: POST base64 JPEG/PNG to /invocations (docs/mlflow.md, Serving).
## serve: the registered model's @champion on 127.0.0.1:5001 (SERVE_PORT; MODEL=models:/name/version)
serve: setup
	@python -m pipeline.tools.make_args serve

## predict: top labels of image files or folders: make predict PATHS="a.jpg photos/"
# PATHS and ARGS are split like a shell line: PATHS="'my photo.jpg' folder/"
predict: setup
	@python -m pipeline.tools.make_args predict

## exp: a grid of DVC experiments (EXP_GRID) in the workspace, then the best applied and compared
exp: setup
	@python -m pipeline.tools.make_args exp

## compare: one table per dataset, best experiment first (ARGS="--all": DVC's full table)
compare: setup
	@python -m pipeline.tools.make_args compare

# Ships a DVC experiment's model: dvc exp apply EXP (data/model, params, dvc.lock), then @champion on
# that model's registered versions, so make serve serves what data/model holds. No EXP: the workspace's model.
EXP ?=
## promote: make an experiment's model the served @champion and the workspace model: make promote EXP=<name>
promote: setup
	@python -m pipeline.tools.make_args promote

# Speed benchmarks on a slice of the archive (~15 min on 2 CPU cores), then quality with real
# weights on the whole archive (~45 min more; only with BENCH_WEIGHTS); writes bench/results.md.
# Then appends the warm loop, cold and with warm workers (bench/warm_loop.py, ~10 min), a 12-experiment
# sweep on the slice (bench/sweep.py, ~30 min), each stage's seconds per 1,000 generated images at 1k, 10k and 100k
# (bench/scaling.py, ~45 min), label_issues' fits at 70,000 images (bench/label_issues_fits.py, ~3 min) and,
# with BENCH_WEIGHTS, memory and disk per run on the whole archive (bench/footprint.py, ~10 min) and
# the head vs logistic regression vs nearest centroid over split seeds (bench/head_quality.py, ~25 min).
#   make bench BENCH_ARCHIVE=/path/to/flower_photos.tgz BENCH_WEIGHTS=/path/to/mobilenet_v2_1.0_224_imagenet_no_top.h5
BENCH_ARCHIVE ?=
BENCH_WEIGHTS ?=
BENCH_PER_CLASS ?= 40
BENCH_ARGS ?= --image-size 299 --epochs 10 --more-epochs 20
## bench: speed and quality benchmarks into bench/results.md (BENCH_ARCHIVE=..., BENCH_WEIGHTS=...)
bench: setup
	@test -n "$(BENCH_ARCHIVE)" || { echo 'usage: make bench BENCH_ARCHIVE=<flower_photos.tgz> [BENCH_WEIGHTS=<MobileNetV2 no-top .h5>]' >&2; exit 2; }
	python bench/run_all.py --archive $(BENCH_ARCHIVE) --per-class $(BENCH_PER_CLASS) $(if $(BENCH_WEIGHTS),--weights $(BENCH_WEIGHTS)) $(BENCH_ARGS)
	python bench/warm_loop.py --archive $(BENCH_ARCHIVE) --per-class $(BENCH_PER_CLASS) --warm --append bench/results.md
	python bench/sweep.py --archive $(BENCH_ARCHIVE) --per-class $(BENCH_PER_CLASS) --append bench/results.md
	python bench/precision.py --append bench/results.md
	python bench/scaling.py --append bench/results.md
	python bench/label_issues_fits.py --append bench/results.md
	$(if $(BENCH_WEIGHTS),python bench/footprint.py --archive $(BENCH_ARCHIVE) --weights $(BENCH_WEIGHTS) --append bench/results.md)
	$(if $(BENCH_WEIGHTS),python bench/head_quality.py --archive $(BENCH_ARCHIVE) --weights $(BENCH_WEIGHTS) --append bench/results.md)

# The TensorFlow stages of the next runs start in a process that has imported TensorFlow, Keras and MLflow
# already: about 3.5 s less per stage (pipeline/warm.py; docs/experiments.md, "Warm workers").
## warm: a warm worker for this project's TensorFlow stages, until 30 min pass without one (or make cold)
warm: setup
	python -m pipeline.warm start
## cold: stop the warm worker (stages start their own processes again)
cold: setup
	python -m pipeline.warm stop

# Data, features and models to/from the DVC remote you configured (docs/experiments.md, Sharing).
## push: push data, features and models to your DVC remote
push: setup
	dvc push
## pull: pull them from your DVC remote
pull: setup
	dvc pull

# Regenerate requirements.lock from pyproject.toml (needs the package index); the lock's current
# pins are kept where they still fit (uv's preference for the output file).
## lock: regenerate requirements.lock, with hashes, from pyproject.toml
lock:
	$(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv pip compile --python-version 3.11 --extra test --generate-hashes pyproject.toml -o requirements.lock

## clean: remove the pipeline's outputs from the workspace (DVC's cache keeps them)
clean:
	rm -rf data/raw data/prepared data/augmented data/features data/checkpoints data/model data/test_probabilities.npz data/export eval reports
	rm -rf .pytest_cache .pytest-tmp
