# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv at the repository root on first use and reuse it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test clean testbed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m accord_face.cli demo --out outputs/demo

# LoRA path on the embedded default (tiny pipeline + synthetic references made at run time).
.PHONY: demo-lora
demo-lora: $(STAMP)
	$(PY) scripts/train_lora.py --config configs/lora_tiny.yaml output_dir=outputs/demo-lora max_steps=40
	@echo "[demo-lora] validation grids: $$(ls outputs/demo-lora/validation/*.png | tr '\n' ' ')"
	@echo "[demo-lora] LoRA for pipe.load_lora_weights: outputs/demo-lora/lora"

test: $(STAMP)
	$(PY) -m pytest -q tests

# The ACCORD coupling testbed (README "Does ACCORD help?"): results in testbed_out/.
testbed: $(STAMP)
	$(PY) scripts/run_testbed.py --config configs/testbed.yaml

clean:
	rm -rf outputs .pytest_cache
