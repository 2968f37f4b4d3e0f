# The two commands a newcomer needs: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo ablate-demo test bench bench-full clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/cachefeat run pipelines/demo.yaml --workdir demo

# the adapters compared with Ray Tune on the demo's caches (about 4 minutes more on 2 cores)
ablate-demo: demo
	$(BIN)/cachefeat ablate pipelines/ablate-demo.yaml --out ablations/demo --overwrite

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/run.py

bench-full: install
	$(BIN)/python benchmarks/run.py --full

clean:
	rm -rf $(VENV) demo runs ablations benchmarks/work .pytest_cache
