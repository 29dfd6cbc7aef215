# Two commands on a fresh machine:
#   make demo   creates .venv and runs the main job end to end (embed, search, compare)
#   make test   creates .venv and runs the tests
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output

.PHONY: demo test lint venv clean

$(BIN)/phiclip: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so that no CUDA build is pulled in by the range below.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/phiclip

venv: $(BIN)/phiclip

demo: venv
	$(BIN)/phiclip demo --output $(DEMO_OUT)

test: venv
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(DEMO_OUT)
