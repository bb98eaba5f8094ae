# Two entry points that set everything up from nothing: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test demo clean rehearse gpu-check

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# -rs lists the reason of every skipped test (e.g. the browser test where Chromium is not installed).
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -rs

demo: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py --out out/demo

# Every stage at full size with random weights on this CPU (about an hour; out/rehearse/rehearsal.md).
rehearse: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/rehearse.py --out out/rehearse

# On a lent GPU, offline: full-size throughput and memory into BENCHMARKS.md's GPU table (under 8 minutes).
gpu-check: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/gpu_check.py --out out/gpu_check --benchmarks BENCHMARKS.md

clean:
	rm -rf out/demo
