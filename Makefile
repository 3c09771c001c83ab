# Quick start: `make demo` (set up, then generate with the embedded default model), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch version tested; pip's index picks the build (PyPI, Linux x86-64: CUDA). TORCH= lets pip resolve torch.
TORCH ?= torch==2.13.0
# The preview model follows its caption style best (models/bonsai-emoji/README.md).
PROMPT ?= grinning face

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml $(wildcard setup.py)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/bonsai generate "$(PROMPT)" --seed 1 -o outputs

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
