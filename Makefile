# Two entry points (README quick start): `make run` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Override for other platforms, e.g. `make test TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: run demo test lint format venv bench device-bundle device-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# ARGS: overrides for train.py, e.g. `make run ARGS=trainer.max_steps=2` (a two-step try of the quickstart).
ARGS ?=
run: venv
	$(PY) train.py $(ARGS)

demo: venv
	$(PY) scripts/estimator_demo.py

test: venv
	$(PY) -m pytest -q --durations=15 tests

# Lint (pyproject's [tool.ruff]: pycodestyle, pyflakes, import order, bugbear, pyupgrade); CI runs it before the tests.
lint: venv
	$(VENV)/bin/ruff check .

# Apply ruff's safe fixes (import order, modern syntax, unused noqa); what remains is for a person to fix.
format: venv
	$(VENV)/bin/ruff check --fix .

bench: venv
	$(PY) benchmarks/bench_estimators.py
	$(PY) benchmarks/bench_training.py

# The device check (scripts/device_check.py, docs/benchmarks.md "Device check"): one short offline run on a GPU
# machine. `make device-bundle` (needs PyPI) writes .whl/ (git-ignored): wheels of what the GPU image lacks, for
# PYTHON_VERSION (3.12: the GPU image; 3.11 etc. for an offline-install test here). `make device-check` installs
# them with pip --no-index and runs every part, one JSON line each, into DEVICE_CHECK_OUT (default $$OUT, else
# device-check-output/). It uses PYTHON (the image's python3 with its torch), not .venv.
PYTHON_VERSION ?= 3.12
DEVICE_CHECK_OUT ?=
device-bundle:
	$(PYTHON) scripts/device_bundle.py make .whl --python-version $(PYTHON_VERSION)

device-check:
	PYTHON=$(PYTHON) bash scripts/device_run.sh $(DEVICE_CHECK_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
