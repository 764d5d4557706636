# Two entry points (README quick start): `make run` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Override for other platforms, e.g. `make test TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: run demo test venv bench device-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(PY) train.py

demo: venv
	$(PY) scripts/estimator_demo.py

test: venv
	$(PY) -m pytest -q --durations=15 tests

bench: venv
	$(PY) benchmarks/bench_estimators.py
	$(PY) benchmarks/bench_training.py

# On a GPU machine: CUDA tests, GPU estimator benchmark, iCT vs iCT + KNN step times; one JSON document.
# Exits 2 without CUDA. Installs nothing beyond `make venv` (faiss-gpu optional: pip install '.[gpu]').
device-check: venv
	$(PY) scripts/device_check.py

clean:
	rm -rf $(VENV) .pytest_cache
