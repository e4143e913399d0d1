# Two commands set everything up on a fresh machine:
#   make demo   trains the default MLP top-k MoE on CPU (about 25 s), with geometry logging (W&B, offline without
#               credentials), and ends by writing the run's dashboard (one HTML page) and printing its path
#   make test   runs the whole test suite (it also runs the docs examples and builds the site)
#   make test-quick  the unit tests of every module, for the edit-test loop (under a minute; docs/testing.md)
#   make docs   builds the documentation site into site/ (MkDocs, --strict)
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,hf,docs]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/moe-lightning fit --config configs/mlp/topk.yaml --config configs/trainer/cpu.yaml

test: $(VENV)/.installed
	WANDB_MODE=offline $(BIN)/python -m pytest -q

# The default suite less the tests marked integration (docs/testing.md). One torch thread: the tensors are tiny,
# and on a shared CPU two threads stall each other.
test-quick: $(VENV)/.installed
	OMP_NUM_THREADS=1 WANDB_MODE=offline $(BIN)/python -m pytest -q -m "not slow and not integration"

docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict -d site

lint: $(VENV)/.installed
	$(BIN)/ruff check moe_lightning tests scripts
	$(BIN)/ruff format --check moe_lightning tests scripts

.PHONY: install demo test test-quick docs lint
