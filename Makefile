# The two commands of the README. Both set up what they need (idempotently) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fasttrain-installed

.PHONY: demo test setup bench rehearsal
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
	$(PY) benchmarks/eval_scaling.py

# ImageNet-LT / iNaturalist 2018 at their real class counts on the CPU (about 15 minutes on 2 cores)
rehearsal: $(STAMP)
	$(PY) benchmarks/scale_rehearsal.py
