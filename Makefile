# Everything bootstraps itself: `make demo` and `make test` create .venv on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS := dev,lab,peers,lightning,keras,tensorboard,transformers
export PYTHONPATH := $(CURDIR)/src
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test lint bench diagnosis reliability clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	@# torch first, pinned, so that nothing after it can pull a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@# Prints the claims table and ends with the report's path; exits 1 if a claim does not hold.
	$(PY) -m gradguard lab run relu-lstm --out runs/demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks reliability
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -n 2 --dist loadgroup

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS),bench]"
	@# backpack-for-pytorch requires torchvision, which has no build matching our CPU torch; neither BackPACK
	@# nor Cockpit imports it on the paths the benchmark uses, so both come without dependencies.
	$(PY) -m pip install -q -c constraints.txt --no-deps backpack-for-pytorch==1.7.1 cockpit-for-pytorch==1.0.2
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py

diagnosis: $(STAMP)
	$(PY) benchmarks/diagnosis.py

reliability: $(STAMP)
	$(PY) reliability/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
