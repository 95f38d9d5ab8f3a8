"""Run the encoder trainer as the user does (a subprocess of scripts/train_encoder.py) on tiny shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# 4 steps on 8 samples (4 shards x 2), no shuffle, checkpoint every step, tiny validation grid.
FAST = ["max_steps=4", "train_batch_size=2", "data.shuffle_buffer=0", "checkpointing.checkpointing_steps=1",
        "checkpointing.checkpoints_total_limit=2", "validation.num_inference_steps=1", "validation.scales=[1.0]",
        "validation.num_faces=1", "validation.validation_prompts=['a photo of a person']", "logging.progress=false",
        "optimizer.learning_rate=0.001", "losses.lambda_pd=0.0"]


def env(**extra) -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
         "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        e.pop(key, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def command(pipeline: str, shards: Path, out: Path, extra: list[str], ranks: int = 1, port: int | None = None
            ) -> list[str]:
    script = [str(ROOT / "scripts" / "train_encoder.py"), "--config", str(ROOT / "configs" / "tiny.yaml")]
    if ranks == 1:
        cmd = [sys.executable] + script
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(port)] + script
    return cmd + [f"pretrained_model={pipeline}", f"shards={shards}", f"output_dir={out}", *FAST, *extra]


def run(pipeline: str, shards: Path, out: Path, extra: list[str] = (), ranks: int = 1, port: int | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    if ranks > 1 and port is None:
        from accord_face.train.guard import free_port

        port = free_port()
    return subprocess.run(command(pipeline, shards, out, list(extra), ranks, port), env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "ip_adapter.safetensors"))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line, after checking the run failed the way a user error should: exit 2, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]
