# One-command setup: `make demo` and `make test` build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)  # pinned CPU torch first: never a multi-GB CUDA build
	$(PY) -m pip install -q -e '.[dev,sweep]'  # sweep: Ray, so the tests cover hil sweep
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hil demo --out out/demo

# pytest exits 5 when it collects no test: make fails on it, never a silent pass
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/emulator.py
	$(PY) benchmarks/calibration.py
	$(PY) benchmarks/drivers.py
	$(PY) benchmarks/sweep.py

clean:
	rm -rf $(VENV) out runs
