"""FaceID-Plus-V2 + identity LoRA under DeepSpeed ZeRO-2 on CPU (gloo): 2 ranks vs 1 rank, then stock diffusers.

Two runs of the tiny Plus-V2 config with ``lora.rank=4`` and both ACCORD losses, same global batch of 4:
  pair    2 ranks (ZeRO-2), micro batch 2
  single  1 rank, micro batch 2 x accumulation 2
The loss curves must agree (the per-sample draws do not depend on the rank layout), the LoRA must have
trained, and the exported folder (adapter + LoRA) must load into a stock pipeline.
About 60-90 s on 2 cores: ``heavy``, run with ``pytest -m heavy``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shards_util import write_shards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, args: list[str], ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(_port())}
    script = [str(ROOT / "scripts" / "train_encoder.py"), "--config", str(ROOT / "configs" / "tiny_faceid_plusv2.yaml")]
    cmd = [sys.executable] + script if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
         "--master_port", env["MASTER_PORT"]] + script
    return subprocess.run(cmd + args + [f"output_dir={out}"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=500)


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("family-ds")
    shards = write_shards(base / "shards", n_shards=4, per_shard=2)
    common = [f"pretrained_model={tiny_pipeline_dir}", f"shards={shards}", "max_steps=3", "train_batch_size=2",
              "data.shuffle_buffer=0", "validation.enabled=false", "optimizer.learning_rate=0.001", "logging.progress=false",
              "lora.rank=4", "losses.lambda_dd=0.3", "losses.lambda_pd=0.01",
              "deepspeed.config=configs/deepspeed/zero2.json"]
    pair = _run(base / "pair", common + ["optimizer.gradient_accumulation_steps=1"], ranks=2)
    single = _run(base / "single", common + ["optimizer.gradient_accumulation_steps=2"], ranks=1)
    return base, pair, single


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_two_ranks_zero2_match_one_rank(runs):
    base, pair, single = runs
    _ok(pair)
    _ok(single)
    one, two = _metrics(base / "single"), _metrics(base / "pair")
    for step in (1, 2, 3):
        for term in ("loss", "mse", "dd", "pd"):
            assert one[step][term] == pytest.approx(two[step][term], rel=1e-3, abs=1e-6), (step, term)
    assert two[3]["loss"] != two[1]["loss"] and two[1]["dd"] > 0


def test_exported_plusv2_and_lora_load_in_stock_diffusers(runs, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from accord_face import adapter
    from accord_face.family.clip_image import load_image_encoder
    from accord_face.family.identity_lora import LORA_WEIGHTS, load_identity_lora

    base, pair, _ = runs
    _ok(pair)
    folder = base / "pair" / "adapter"
    info = json.loads((folder / adapter.CONFIG_NAME).read_text())
    assert info["encoder"] == "faceid_plusv2" and info["shortcut"] is True
    assert info["identity_lora"]["rank"] == 4 and (folder / LORA_WEIGHTS).is_file()
    lora = load_file(str(folder / LORA_WEIGHTS))
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and max(float(v.abs().max()) for v in ups) > 0          # B started at zero: it trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)
    assert load_identity_lora(pipe, folder, scale=0.8)
    enc = load_image_encoder(info["image_encoder_path"])
    clip = enc(torch.randint(0, 256, (1, 3, enc.image_size, enc.image_size), dtype=torch.uint8))
    adapter.set_faceid_plus_inputs(pipe.unet, adapter.faceid_plus_clip_embeds(clip, enc.null_embeds(), batch=1),
                                   shortcut=True, s_scale=info["s_scale"])
    ident = torch.nn.functional.normalize(torch.randn(128), dim=0)
    image = pipe("a photo of a person", num_inference_steps=2, output_type="np",
                 ip_adapter_image_embeds=adapter.identity_image_embeds(ident),
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
