# Two commands for a fresh machine: `make run` and `make test`. Everything else builds on them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The CUDA toolkit root (holding include/ and lib64/); the CUDA kernels compile when it exists.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda /usr/local/cuda-13.0 /opt/cuda))
export CUDA_HOME
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: run test build install bench fuzz sanitize lint format clean

# A virtual environment with the pinned requirements and this package registered (editable,
# Python only: the extension is built in place below, incrementally).
$(VENV)/.installed: requirements-dev.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	AANET_KERNELS_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Builds aanet_kernels._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and a
# toolkit is found (no GPU needed). ninja rebuilds only what changed.
build: install
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import aanet_kernels as ak; print('aanet_kernels backends here:', ak.available_backends())"

test: build lint
	$(PY) -m pytest tests -q -p no:cacheprovider
	TRITON_INTERPRET=1 $(PY) -m pytest tests/triton_interpret -q -p no:cacheprovider

run: build
	$(PY) -m aanet run

# `make bench`: the CPU benchmarks in about 8 minutes on 2 cores (dense baselines only up to
# L = 1024, no FlexAttention: it compiles for half a minute per shape, AAConv2d at 28x28 and
# 14x14, fewer repeats), into benchmarks/results/quick/.
# `make bench FULL=1`: the full CPU attention (FlexAttention included) and AAConv2d tables
# published in benchmarks/results/ (about 50 minutes); the training and per-sample-gradient tables have their own scripts (README).
ifdef FULL
BENCH_OUT := benchmarks/results
BENCH_ATTENTION_FLAGS :=
BENCH_AACONV_FLAGS :=
else
BENCH_OUT := benchmarks/results/quick
BENCH_ATTENTION_FLAGS := --max-dense-length 1024 --budget 1 --repeats 5 \
	--methods reference,cpu,sdpa_dense,sdpa_nobias
BENCH_AACONV_FLAGS := --sizes 28 14 --repeats 3
endif

bench: build
	$(PY) benchmarks/bench_attention.py --device cpu --preset cpu --out-dir $(BENCH_OUT) $(BENCH_ATTENTION_FLAGS)
	$(PY) benchmarks/bench_aaconv.py --device cpu --out-dir $(BENCH_OUT) $(BENCH_AACONV_FLAGS)

# The property-based and fuzz tests with long budgets; the Triton ones under the interpreter, in
# their own process as in `make test`.
fuzz: build
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests -q -m fuzz -p no:cacheprovider
	HYPOTHESIS_PROFILE=fuzz TRITON_INTERPRET=1 $(PY) -m pytest tests/triton_interpret -q -m fuzz -p no:cacheprovider

# The C++ CPU kernels built with AddressSanitizer and UBSan (into build/sanitize, the in-place build
# is left alone), then the CPU op tests with that build loaded (tests/conftest.py preloads the file
# named by AANET_KERNELS_TEST_EXTENSION). The RSS-growth test is left out: ASan's allocator keeps
# freed memory in quarantine, so RSS says nothing there.
SANITIZED_EXTENSION = build/sanitize/lib/aanet_kernels/_C.abi3.so
sanitize: install
	rm -rf build/sanitize && AANET_KERNELS_SANITIZE=1 AANET_KERNELS_SKIP_CUDA=1 \
	  $(PY) setup.py -q build_ext --build-temp build/sanitize --build-lib build/sanitize/lib
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  AANET_KERNELS_TEST_EXTENSION=$(SANITIZED_EXTENSION) \
	  $(PY) -m pytest tests/test_attention_cpu.py tests/test_input_errors.py tests/test_hardening.py \
	  tests/test_properties.py -k "not grow_memory" -q -p no:cacheprovider

lint: install
	$(PY) -m ruff check aanet_kernels aanet benchmarks tests setup.py
	$(PY) -m ruff format --check aanet_kernels aanet benchmarks tests setup.py

format:
	$(PY) -m ruff format aanet_kernels aanet benchmarks tests setup.py

clean:
	rm -rf build aanet_kernels/_C*.so aanet_kernels/_build_info.py
