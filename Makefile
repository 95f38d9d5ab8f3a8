# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv at the repository root on first use and reuse it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test clean testbed testbed-pp world-length

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole flow, offline, in about 10 minutes on 2 CPU cores (README "The identity world"):
# 1. the real face path: public-domain portraits from installed packages -> shards (YuNet + SFace);
# 2. the learning happens in the identity world: synthetic people -> shards (world detector +
#    recognizer) -> IP-Adapter-FaceID trained on embedded:faces under the deepspeed launcher with
#    ACCORD on -> exported adapter -> zero-shot evaluation on 50 held-out people (identity with vs
#    without the adapter, retrieval, context accuracy, CLIP-T) -> accord-face generate on one of them.
# Every step resumes or is skipped when rerun.
DEMO := outputs/demo
DEMO_IDS ?= 1500
DEMO_STEPS ?= 600
DEMO_EVAL_IDS ?= 50
DEMO_PORT ?= 29731
demo: $(STAMP)
	$(PY) -c "from data_pipelines.embedded import write_embedded_photos as w; w('$(DEMO)/photos')"
	$(PY) scripts/prepare_shards.py --input $(DEMO)/photos --output $(DEMO)/shards --no-progress
	$(PY) -m accord_face.world photos --out $(DEMO)/world-photos --identities 0:$(DEMO_IDS) --per-identity 4
	$(PY) scripts/prepare_shards.py --input $(DEMO)/world-photos --output $(DEMO)/world-shards --backend world \
		--resolution 64 --context-scale 8 --min-image-size 32 --workers 2 --no-progress
	$(VENV)/bin/deepspeed --num_gpus 1 --master_port $(DEMO_PORT) scripts/train_encoder.py --config configs/faces.yaml \
		shards=$(DEMO)/world-shards output_dir=$(DEMO)/world-train max_steps=$(DEMO_STEPS)
	$(PY) -m accord_face.world evaluate --adapter $(DEMO)/world-train/adapter --out $(DEMO)/eval \
		--identities $(DEMO_EVAL_IDS)
	$(PY) -m accord_face.cli generate --adapter $(DEMO)/world-train/adapter --face $(DEMO)/eval/references/h2000.png \
		--prompt "a photo of a person wearing a yellow shirt and glasses on a purple background" \
		--prompt "a close up photo of a person wearing a white shirt and a hat on a green background" \
		--num-images 2 --steps 25 --guidance 4 --out $(DEMO)/generate
	@echo "[demo] real-photo shards: $(DEMO)/shards (manifest.json, skipped.jsonl)"
	@echo "[demo] world shards:      $(DEMO)/world-shards"
	@echo "[demo] training logs:     $(DEMO)/world-train/logs (tensorboard --logdir ...), $(DEMO)/world-train/metrics.jsonl"
	@echo "[demo] adapter:           $(DEMO)/world-train/adapter (pipe.load_ip_adapter(dir, subfolder='', weight_name='ip_adapter.safetensors', image_encoder_folder=None))"
	@echo "[demo] evaluation:        $(DEMO)/eval/metrics.json, $(DEMO)/eval/grid.png (reference | adapter | no adapter)"
	@echo "[demo] zero-shot grid:    $(DEMO)/generate/grid.png"

# LoRA path on the embedded default (tiny pipeline + synthetic references made at run time).
.PHONY: demo-lora
demo-lora: $(STAMP)
	$(PY) scripts/train_lora.py --config configs/lora_tiny.yaml output_dir=outputs/demo-lora max_steps=40
	@echo "[demo-lora] validation grids: $$(ls outputs/demo-lora/samples/*.png | tr '\n' ' ')"
	@echo "[demo-lora] LoRA for pipe.load_lora_weights: outputs/demo-lora/lora"

test: $(STAMP)
	$(PY) -m pytest -q tests

# The ACCORD coupling testbed, protocol v2 (README "Does ACCORD help?"): results in testbed_out/.
# One pass prepares (base model, judge, fine-tune strength on held-out seeds, lambda calibration),
# then the reference sets run as two processes (one per core), then one pass aggregates
# (finished runs are reused, never recomputed; a rerun resumes).
TESTBED_ARGS ?=
TESTBED_SETS_A ?= [0,2,4]
TESTBED_SETS_B ?= [1,3,5]
testbed: $(STAMP)
	mkdir -p testbed_out
	$(PY) scripts/run_testbed.py --config configs/testbed.yaml threads=1 prepare_only=true $(TESTBED_ARGS) > testbed_out/prepare.log 2>&1 || { tail -n 20 testbed_out/prepare.log; exit 1; }
	$(PY) scripts/run_testbed.py --config configs/testbed.yaml threads=1 ref_sets=$(TESTBED_SETS_A) $(TESTBED_ARGS) > testbed_out/setsA.log 2>&1 & \
	$(PY) scripts/run_testbed.py --config configs/testbed.yaml threads=1 ref_sets=$(TESTBED_SETS_B) $(TESTBED_ARGS) > testbed_out/setsB.log 2>&1; \
	s1=$$?; wait $$!; s0=$$?; test $$s0 = 0 -a $$s1 = 0 || { tail -n 20 testbed_out/setsA.log testbed_out/setsB.log; exit 1; }
	$(PY) scripts/run_testbed.py --config configs/testbed.yaml $(TESTBED_ARGS)

# The encoder coupling experiment (README "Does ACCORD help the encoder?"): the main job trained per arm
# and seed on the identity world, evaluated on 50 held-out people; results in testbed_out/encoder/.
# Finished runs are reused (and restored from docs/encoder_coupling in a fresh checkout).
# ENCODER_ARGS: e.g. arms=[baseline,dd_r0.3] seeds=[0,1,2]; analyze_only=true to aggregate only.
ENCODER_ARGS ?= arms=[baseline,dd_r0.3,control_other_photo,control_rho0] seeds=[0,1,2]
# Protocol v2, revision "pp": every arm with DreamBooth prior preservation (configs/testbed_pp.yaml; README)
testbed-pp: $(STAMP)
	mkdir -p testbed_out/pp
	$(PY) scripts/run_testbed.py --config configs/testbed_pp.yaml threads=1 $(TESTBED_ARGS)

# Protocol v2, revision "long": v2's design on a base model trained 10,000 steps (configs/testbed_long.yaml; README)
.PHONY: testbed-long
testbed-long: $(STAMP)
	mkdir -p testbed_out/long
	$(PY) scripts/run_testbed.py --config configs/testbed_long.yaml threads=1 $(TESTBED_ARGS)

.PHONY: testbed-long-powered
testbed-long-powered: $(STAMP)
	mkdir -p testbed_out/long
	$(PY) scripts/run_testbed.py --config configs/testbed_long_powered.yaml threads=1 $(TESTBED_ARGS)

# Identity transfer vs training length (issue: how long must the main job train?); resumable
world-length: $(STAMP)
	$(PY) scripts/run_world_length.py $(LENGTH_ARGS)

# Branches from the length plateau (lr decay, identity LoRA), paired against a control; resumable
.PHONY: world-capacity
world-capacity: $(STAMP)
	$(PY) scripts/run_world_capacity.py $(CAPACITY_ARGS)

.PHONY: testbed-encoder
testbed-encoder: $(STAMP)
	$(PY) scripts/run_encoder_experiment.py $(ENCODER_ARGS)

clean:
	rm -rf outputs .pytest_cache
