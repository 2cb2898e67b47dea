# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install the package with torch pinned to the local CPU build
# (constraints.txt is passed to every install so nothing pulls a CUDA build).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -m "not heavy"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/runtime_overhead.py
	$(PY) benchmarks/llm_generate.py
	$(PY) benchmarks/diffusion.py
	$(PY) benchmarks/vision.py
	$(PY) benchmarks/guardrail.py
	$(PY) benchmarks/calibration.py

clean:
	rm -rf $(VENV) .pytest_cache
