# Quick start: `make lab` (set-up, then full / h2o / local on XSUM with the embedded SmolLM2,
# evaluated by HELM; TASK=multi_news or TASK=needle for the long-input tasks) and `make test`.
# Both create .venv when missing and work offline after.
PYTHON_SYSTEM ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Task and requests for `make lab`; LAB_N=500 runs the whole vendored XSUM sample.
TASK ?= xsum
LAB_N ?= 10
LAB_BATCH ?= 4

.PHONY: venv lab test clean-lab

venv: $(STAMP)

# The pinned requirements, then this project (h2o, lab_helm) in editable mode with no
# dependencies of its own and no build isolation (so offline too), then HELM's offline set-up.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml helm/setup_offline.sh
	@command -v $(PYTHON_SYSTEM) >/dev/null || { echo "make: $(PYTHON_SYSTEM) not found (set PYTHON_SYSTEM=...)" >&2; exit 2; }
	[ -x $(PY) ] || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	PYTHON=$(PY) bash helm/setup_offline.sh
	touch $(STAMP)

lab: venv
	LAB_TASK=$(TASK) LAB_N=$(LAB_N) LAB_BATCH=$(LAB_BATCH) bash scripts/lab.sh

test: venv
	$(PY) -m pytest tests -q

clean-lab:
	rm -rf out/lab helm/benchmark_output/runs/lab-* helm/benchmark_output/prod_env/lab-*
