# Commands for a fresh machine:
#   make smoke   set up .venv and run the smoke training (seconds, generated data)
#   make test    set up .venv and run the test suite
#   make verify  set up .venv and check the machine end to end (tools/verify.py; extra flags
#                in VERIFY_FLAGS, e.g. VERIFY_FLAGS='--data_root data/cifar10')
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup smoke test verify train clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

smoke: setup
	$(PY) -m jaxres.train --config experiments/smoke.py --workdir runs/smoke --config.resume=False

# One pytest worker per core, each test file on one worker (its module fixtures run once):
# most tests wait on single-threaded XLA compiles, so two workers on two cores save time.
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile

verify: setup
	$(PY) -m tools.verify $(VERIFY_FLAGS)

train: setup
	$(PY) -m jaxres.train --config experiments/base.py --workdir runs/base

clean:
	rm -rf runs
