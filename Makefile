# Two commands on a fresh machine:
#   make demo   creates .venv and runs the main job end to end (embed, search, compare)
#   make test   creates .venv and runs the tests
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output

.PHONY: demo test lint venv clean torch

$(BIN)/phiclip: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, so that the range in pyproject.toml installs nothing more: the CUDA build where an
	# NVIDIA driver is present, else the CPU build from PyTorch's CPU index (about 200 MB instead of
	# several GB). Where that index cannot be reached, pip's own configuration decides (TORCH_INDEX overrides).
	$(BIN)/python -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch
	# Without an NVIDIA driver, the compiled CPU runtimes too (OpenVINO, ONNX Runtime: about 100 MB of wheels,
	# 310 MB installed), which the default runtime=auto measures against torch (docs/reference.md#cpu-runtimes).
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q -e ".[dev]"; \
	else \
	  $(BIN)/pip install -q -e ".[dev,cpu-runtimes]"; \
	fi
	touch $(BIN)/phiclip

venv: $(BIN)/phiclip

TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
torch:
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q "torch==2.13.0"; \
	else \
	  $(BIN)/pip install -q "torch==2.13.0" --index-url $(TORCH_INDEX) --timeout 15 --retries 1 \
	    || $(BIN)/pip install -q "torch==2.13.0"; \
	fi

demo: venv
	$(BIN)/phiclip demo --output $(DEMO_OUT)

test: venv
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(DEMO_OUT)
