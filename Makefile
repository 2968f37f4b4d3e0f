# The two commands a newcomer needs: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# optional extras to install besides the tests' (pyproject.toml), e.g. `make install EXTRAS=siglip`
EXTRAS ?=

.PHONY: install demo ablate-demo test bench bench-full gpu-check clean

comma := ,
STAMP := $(VENV)/.installed$(if $(EXTRAS),-$(subst $(comma),-,$(EXTRAS)))

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	touch $@

demo: install
	$(BIN)/cachefeat run pipelines/demo.yaml --workdir demo

# the adapters compared with Ray Tune on the demo's caches (about 4 minutes more on 2 cores)
ablate-demo: demo
	$(BIN)/cachefeat ablate pipelines/ablate-demo.yaml --out ablations/demo --overwrite

test: install
	$(BIN)/ruff check .
	$(BIN)/bandit -c pyproject.toml -r cachefeat benchmarks
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/run.py

bench-full: install
	$(BIN)/python benchmarks/run.py --full

# GPU acceptance (docs/gpu-check.md): no install step, so it runs where the project is not pip-installed
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) demo runs ablations benchmarks/work .pytest_cache
