# Two commands are the whole setup on a fresh machine:
#   make demo   create .venv, install, fetch MNIST, train a small model, sample a grid
#   make test   create .venv, install the dev extras, run the linter and the tests
PYTHON ?= python3
DEMO_BUDGET ?= 7m
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test test-fast lint bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import ddpm_mnist, torch, torchvision"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import ddpm_mnist, torch, torchvision, pytest"
	touch $@ $(VENV)/.installed

test: $(VENV)/.installed-dev
	$(BIN)/ruff check ddpm_mnist tests scripts
	$(BIN)/python -m pytest -q

# the tests that train no model: the loop while editing
test-fast: $(VENV)/.installed-dev
	$(BIN)/ruff check ddpm_mnist tests scripts
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check ddpm_mnist tests scripts

# configs/cpu.yaml for a 7-minute time budget (DEMO_BUDGET: the whole demo then fits 10 minutes on 2 cores); --resume continues (or reuses) an earlier demo run
demo: $(VENV)/.installed
	PYTHON=$(BIN)/python scripts/fetch_mnist.sh data
	$(BIN)/ddpm train --config configs/cpu.yaml --set name=demo --set train.steps=0 --set train.epochs=0 \
		--set train.time_budget=$(DEMO_BUDGET) --resume
	$(BIN)/ddpm sample --ckpt runs/demo/checkpoints/latest.pt --out runs/demo/samples.png \
		--trajectory runs/demo/trajectory.gif --tensor runs/demo/samples.pt
	$(BIN)/ddpm eval --samples runs/demo/samples.pt --json runs/demo/eval.json
	@echo "demo done: runs/demo/samples.png (measured in runs/demo/eval.json), runs/demo/trajectory.gif; tensorboard --logdir runs"

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench.py

clean-venv:
	rm -rf $(VENV)
