# `make demo` trains and evaluates the main model on the embedded `shapes` dataset;
# `make test` runs the test suite. Both bootstrap .venv/ first, when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := $(wildcard maskpyramid projects tools tests benchmarks train_net.py)
SETUP_INPUTS := requirements.txt setup.cfg pyproject.toml tools/build_detectron2.py maskpyramid/compat.py

.PHONY: venv demo test lint format

venv: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) tools/build_detectron2.py --out build/wheels
	$(PY) -m pip install --quiet --no-deps --force-reinstall build/wheels/detectron2-*.whl
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train_net.py --config-file configs/shapes/mask_pyramid_R_18_FPN.yaml OUTPUT_DIR output/demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m flake8 $(LINT_PATHS)
	$(PY) -m isort --check-only --diff $(LINT_PATHS)
	$(PY) -m black --check $(LINT_PATHS)

format: $(STAMP)
	$(PY) -m isort $(LINT_PATHS)
	$(PY) -m black $(LINT_PATHS)
