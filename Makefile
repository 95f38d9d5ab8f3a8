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

# The whole flow on the embedded default (a few minutes on 2 CPU cores, offline):
# public-domain portraits from installed packages -> shards (YuNet + SFace) ->
# tiny encoder trained under the deepspeed launcher with ACCORD on -> exported
# adapter -> zero-shot samples through stock diffusers. Rerunning resumes.
DEMO := outputs/demo
DEMO_STEPS ?= 40
DEMO_PORT ?= 29731
demo: $(STAMP)
	$(PY) -c "from data_pipelines.embedded import write_embedded_photos as w; w('$(DEMO)/photos')"
	$(PY) scripts/prepare_shards.py --input $(DEMO)/photos --output $(DEMO)/shards --no-progress
	$(VENV)/bin/deepspeed --num_gpus 1 --master_port $(DEMO_PORT) scripts/train_encoder.py --config configs/tiny.yaml \
		shards=$(DEMO)/shards output_dir=$(DEMO)/train max_steps=$(DEMO_STEPS)
	$(PY) -m accord_face.cli generate --adapter $(DEMO)/train/adapter --face $(DEMO)/photos/grace_hopper_orig.jpg \
		--prompt "a photo of a person on a beach" --prompt "a photo of a person in a city street at night" \
		--num-images 2 --out $(DEMO)/generate
	@echo "[demo] shards:           $(DEMO)/shards (manifest.json, skipped.jsonl)"
	@echo "[demo] training logs:    $(DEMO)/train/logs (tensorboard --logdir $(DEMO)/train/logs), $(DEMO)/train/metrics.jsonl"
	@echo "[demo] validation grids: $(DEMO)/train/samples"
	@echo "[demo] adapter:          $(DEMO)/train/adapter (pipe.load_ip_adapter(dir, subfolder='', weight_name='ip_adapter.safetensors', image_encoder_folder=None))"
	@echo "[demo] zero-shot grid:   $(DEMO)/generate/grid.png"

# LoRA path on the embedded default (tiny pipeline + synthetic references made at run time).
.PHONY: demo-lora
demo-lora: $(STAMP)
	$(PY) scripts/train_lora.py --config configs/lora_tiny.yaml output_dir=outputs/demo-lora max_steps=40
	@echo "[demo-lora] validation grids: $$(ls outputs/demo-lora/samples/*.png | tr '\n' ' ')"
	@echo "[demo-lora] LoRA for pipe.load_lora_weights: outputs/demo-lora/lora"

test: $(STAMP)
	$(PY) -m pytest -q tests

# The ACCORD coupling testbed (README "Does ACCORD help?"): results in testbed_out/.
# The two reference sets run as two processes (one per core), then one pass
# aggregates (finished runs are reused, never recomputed).
TESTBED_ARGS ?=
testbed: $(STAMP)
	mkdir -p testbed_out
	$(PY) scripts/run_testbed.py --config configs/testbed.yaml threads=1 ref_sets=[0] $(TESTBED_ARGS) > testbed_out/ref0.log 2>&1 & \
	$(PY) scripts/run_testbed.py --config configs/testbed.yaml threads=1 ref_sets=[1] $(TESTBED_ARGS) > testbed_out/ref1.log 2>&1; \
	s1=$$?; wait $$!; s0=$$?; test $$s0 = 0 -a $$s1 = 0 || { tail -n 20 testbed_out/ref0.log testbed_out/ref1.log; exit 1; }
	$(PY) scripts/run_testbed.py --config configs/testbed.yaml $(TESTBED_ARGS)

clean:
	rm -rf outputs .pytest_cache
