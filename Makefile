# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv at the repository root on first use and reuse it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m accord_face.cli demo --out outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs .pytest_cache
