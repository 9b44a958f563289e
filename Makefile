PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install demo test stress bench lint format clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: $(STAMP)  ## make .venv and install gpurun editable with the test extra

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(BIN)/python -m compileall -q gpurun
	touch $@

demo: $(STAMP)  ## run three real jobs on the sample config's 4 declared GPUs
	bash examples/demo.sh

test: $(STAMP)  ## run the whole test suite
	$(BIN)/pytest -q

stress: $(STAMP)  ## 300 jobs with random kills for about 2 minutes, then the invariant checker's verdict
	$(BIN)/python tests/stress.py --jobs 300 --seconds 120 --gpus 8

bench: $(STAMP)  ## measure the figures in bench/ against their goals
	$(BIN)/python -m compileall -q gpurun
	$(BIN)/python bench/run.py

lint: $(STAMP)  ## check style with ruff
	$(BIN)/ruff check gpurun tests examples bench
	$(BIN)/ruff format --check gpurun tests examples bench

format: $(STAMP)  ## reformat with ruff
	$(BIN)/ruff format gpurun tests examples bench
	$(BIN)/ruff check --fix gpurun tests examples bench

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
