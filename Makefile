# Quick start: `make lab` (set-up, then full / h2o / local on XSUM with the embedded SmolLM2,
# evaluated by HELM; TASK=cnn_dm for CNN/DailyMail, TASK=multi_news or TASK=needle for the
# long-input tasks; TASK=copa and the other lm-eval tasks for their accuracy table, as
# `make lab-lm-eval`) and `make test`.
# Both create .venv when missing and work offline after.
# The first Python from 3.11 up among python3.11, python3, python3.12, python3.13 (PYTHON_SYSTEM=...
# overrides).
ifeq ($(origin PYTHON_SYSTEM),undefined)
PYTHON_SYSTEM := $(firstword $(foreach p,python3.11 python3 python3.12 python3.13,$(shell command -v $(p) >/dev/null 2>&1 && $(p) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo $(p))) python3.11)
endif
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Task and requests for `make lab`; LAB_N=500 runs the whole vendored XSUM sample.
TASK ?= xsum
LAB_N ?= 10
LAB_BATCH ?= 4

# `make serve`: helm-server on 127.0.0.1 over this suite (make lab's, by default).
SUITE ?= $(if $(filter xsum,$(TASK)),lab-$(LAB_N),lab-$(TASK)-$(LAB_N))
PORT ?= 8000

.PHONY: help venv lab lab-lm-eval test serve clean-lab

help:
	@echo "make venv       create .venv: pinned CPU torch, Triton, transformers, crfm-helm, h2o and lab_helm (editable)"
	@echo "make lab        full / h2o / local on LAB_N=$(LAB_N) $(TASK) requests with SmolLM2, scored by HELM (TASK=cnn_dm|multi_news|needle; TASK=copa...: lab-lm-eval)"
	@echo "make lab-lm-eval  full / h2o / local on LAB_N documents of an lm-eval TASK (copa, openbookqa, piqa, winogrande, rte, mathqa), 5-shot: accuracy table"
	@echo "make test       the test suite (pytest tests)"
	@echo "make serve      helm-server on http://127.0.0.1:$(PORT) over SUITE=$(SUITE) (make lab's results)"
	@echo "make clean-lab  remove make lab's results (out/lab, its HELM suites)"
	@echo "make help       this list"

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

lab-lm-eval: venv
	$(PY) -m h2o.lab.lm_eval_lab --task $(if $(filter xsum,$(TASK)),copa,$(TASK)) --limit $(LAB_N) --batch_size $(LAB_BATCH)

test: venv
	$(PY) -m pytest tests -q

serve: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash helm/serve_local.sh --suite $(SUITE) --port $(PORT)

clean-lab:
	rm -rf out/lab helm/benchmark_output/runs/lab-* helm/benchmark_output/prod_env/lab-*
