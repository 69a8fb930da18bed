# fedpath: one target per stage. `make demo` and `make test` install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here, not in pyproject: a looser spec pulls several GB of CUDA wheels on CPU machines.
# A GPU user overrides it: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/demo.yaml
SITE ?=
DATA_ROOT ?= $(if $(FEDPATH_DATA_ROOT),$(FEDPATH_DATA_ROOT),../shared/data)
export FEDPATH_DATA_ROOT := $(abspath $(DATA_ROOT))
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install lint test test-slow demo synth tile train provision serve site-round site-model simulate \
        infer attack report experiment calibrate bench clean pretrain experiment-oneshot

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q $(TORCH_SPEC) 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q -e '.[test]' 2>&1 | grep -v -e "^WARNING: Location" -e "BuildBackendWarning" || true
	$(BIN)/python -c "import torch, monai, opacus, openslide, tifffile, zarr; print('fedpath: installed torch', torch.__version__)"
	touch $(STAMP)

lint: install
	$(BIN)/ruff check fedcore wsi pipeline federation fedpath tests bench scripts
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest -q -m "not slow" --durations=20 $(PYTEST_ARGS)

test-slow: install
	$(BIN)/pytest -q -m "slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/fedpath demo --config $(CONFIG)

synth: install
	$(BIN)/fedpath synth --config $(CONFIG)

tile: install
	$(BIN)/fedpath tile --config $(CONFIG) $(if $(SITE),--site $(SITE),)

train: install
	$(BIN)/fedpath train --config $(CONFIG) $(if $(SITE),--site $(SITE),)

pretrain: install
	$(BIN)/fedpath pretrain --config $(CONFIG)

provision: install
	$(BIN)/fedpath provision --config $(CONFIG)

serve: install
	$(BIN)/fedpath serve --config $(CONFIG)

site-round: install
	@test -n "$(SITE)" || { echo "make site-round needs SITE=<name>"; exit 2; }
	$(BIN)/fedpath site-round --config $(CONFIG) --site $(SITE)

site-model: install
	@test -n "$(SITE)" || { echo "make site-model needs SITE=<name>"; exit 2; }
	$(BIN)/fedpath site-model --config $(CONFIG) --site $(SITE)

simulate: install
	$(BIN)/fedpath simulate --config $(CONFIG)

infer: install
	$(BIN)/fedpath infer --config $(CONFIG) $(if $(SITE),--site $(SITE),)

attack: install
	$(BIN)/fedpath attack --config $(CONFIG)

report: install
	$(BIN)/fedpath report --config $(CONFIG)

experiment-oneshot: install
	$(BIN)/fedpath experiment-oneshot --config $(CONFIG)

EPSILONS ?=
experiment: install
	$(BIN)/fedpath experiment --config $(CONFIG) $(if $(EPSILONS),--epsilons $(EPSILONS))

CALIBRATE ?= configs/calibrate.yaml
calibrate: install
	$(BIN)/fedpath calibrate --config $(CALIBRATE)

bench: install
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
