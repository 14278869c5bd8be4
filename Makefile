# Two commands are the whole setup on a fresh machine:
#   make demo   create .venv, install, fetch MNIST, train a small model, sample a grid
#   make test   create .venv, install the dev extras, run the linter and the tests
PYTHON ?= python3
DEMO_STEPS ?= 800
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test lint bench clean-venv

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

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check ddpm_mnist tests scripts

# configs/cpu.yaml, shortened; --resume continues (or reuses) an earlier demo run
demo: $(VENV)/.installed
	PYTHON=$(BIN)/python scripts/fetch_mnist.sh data
	$(BIN)/ddpm train --config configs/cpu.yaml --set name=demo --set train.steps=$(DEMO_STEPS) --resume
	$(BIN)/ddpm sample --ckpt runs/demo/checkpoints/latest.pt --out runs/demo/samples.png \
		--trajectory runs/demo/trajectory.gif
	@echo "demo done: runs/demo/samples.png, runs/demo/trajectory.gif; tensorboard --logdir runs"

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench.py

clean-venv:
	rm -rf $(VENV)
