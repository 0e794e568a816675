# Two commands do all set-up on a fresh machine with Python 3.11+:
#   make quickstart   - venv + install + the whole pipeline on the embedded corpus (CPU, a few minutes)
#   make test         - venv + install + lint + the test suite
# TORCH picks the torch build installed first (CI uses the CPU build; on a GPU box: make TORCH=torch ...).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.antimatter-installed

.PHONY: venv quickstart test lint notebooks guide bench-train bench-decode clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)" \
		|| $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

quickstart: venv
	$(BIN)/antimatter quickstart

test: venv
	$(BIN)/ruff check src tests benchmarks scripts notebooks
	$(BIN)/python -m pytest

guide: venv
	$(BIN)/python scripts/run_guide.py

notebooks: venv
	$(BIN)/python scripts/run_notebooks.py

lint: venv
	$(BIN)/ruff check src tests benchmarks scripts notebooks
	$(BIN)/ruff format --check src tests benchmarks scripts || true

clean:
	rm -rf runs .pytest_cache .ruff_cache
