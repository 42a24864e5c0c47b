# The two commands of the README. Both set up what they need (idempotently) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fasttrain-installed

.PHONY: demo test setup bench
demo: $(STAMP)
	$(PY) recipes/fmnist_lt.py --out runs/fmnist_lt

test: $(STAMP)
	$(PY) -m pytest -q tests

setup: $(STAMP)
$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

bench: $(STAMP)
	$(PY) benchmarks/convert_throughput.py
	$(PY) benchmarks/loader_throughput.py --out benchmarks/results/loader_throughput.json
	$(PY) benchmarks/train_throughput.py
