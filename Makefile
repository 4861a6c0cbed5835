# `make demo` trains and evaluates the main model on the embedded `shapes` dataset;
# `make test` runs the test suite. Both bootstrap .venv/ first, when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := $(wildcard maskpyramid projects tools tests benchmarks train_net.py demo.py)
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

# The demo trains the shapes config's 200 iterations without its class negatives (which make a
# training step about 1.5x slower, and `make demo` must stay under 15 minutes on 2 CPU cores);
# the config itself, e.g. its _long twin, trains with them. After 200 iterations the refinement
# head, which predicts each mask itself, still predicts empty masks: the demo's evaluation reads
# the masks out on the p2 grid (REFINE_SCORE_THRESH 1.0: no output is refined).
DEMO_OPTS := MODEL.MASK_PYRAMID.CLASS_NEGATIVE_ROOTS 0 MODEL.MASK_PYRAMID.SCORE_MODE root \
	MODEL.MASK_PYRAMID.REFINE_SCORE_THRESH 1.0

demo: $(STAMP)
	$(PY) train_net.py --config-file configs/shapes/mask_pyramid_R_18_FPN.yaml $(DEMO_OPTS) \
		OUTPUT_DIR output/demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m flake8 $(LINT_PATHS)
	$(PY) -m isort --check-only --diff $(LINT_PATHS)
	$(PY) -m black --check $(LINT_PATHS)

format: $(STAMP)
	$(PY) -m isort $(LINT_PATHS)
	$(PY) -m black $(LINT_PATHS)
