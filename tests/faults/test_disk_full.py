"""Disk full (an injected writer raising ENOSPC) and unwritable outputs: the previous complete state stays,
the error is one line naming the path, and a rerun after space is freed completes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest


def _prep_args(photos: Path, out: Path):
    from data_pipelines.prepare_shards import build_parser

    parser = build_parser()
    return parser.parse_args(["--input", str(photos), "--output", str(out), "--shard-size", "2", "--resolution",
                              "64", "--no-progress", "--workers", "0"]), parser


def _exit_line(capsys, fn) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        fn()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return info.value.code, err[0]


def test_shard_writer_disk_full_then_rerun_completes(tmp_path, monkeypatch, capsys):
    import webdataset as wds

    from data_pipelines.embedded import write_embedded_photos
    from data_pipelines.prepare_shards import run

    photos = write_embedded_photos(tmp_path / "in")
    out = tmp_path / "out"
    real_write, calls = wds.TarWriter.write, [0]

    def write(self, sample):
        calls[0] += 1
        if calls[0] == 5:   # two shards committed, the third half written
            raise OSError(errno.ENOSPC, "No space left on device", getattr(self, "_path", None) or str(out))
        return real_write(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", write)
    code, line = _exit_line(capsys, lambda: run(*_prep_args(photos, out)))
    assert code == 2 and "the disk is full" in line and str(out) in line and "rerun" in line, line
    committed = [json.loads(x) for x in (out / ".journal.jsonl").read_text().splitlines()[1:]]
    names = [c["shard"]["name"] for c in committed if c.get("shard")]
    assert len(names) == 2 and all((out / n).is_file() for n in names)   # the complete state is intact
    monkeypatch.undo()
    args, parser = _prep_args(photos, out)
    assert run(args, parser) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][:2] == [c["shard"] for c in committed if c.get("shard")]
    assert not list(out.glob(".*.tmp"))


def test_shard_output_under_a_file_is_one_line(tmp_path, capsys):
    from data_pipelines.embedded import write_embedded_photos
    from data_pipelines.prepare_shards import run

    photos = write_embedded_photos(tmp_path / "in")
    (tmp_path / "f").write_text("x")
    code, line = _exit_line(capsys, lambda: run(*_prep_args(photos, tmp_path / "f" / "out")))
    assert code == 2 and "prepare_shards: error:" in line and "f/out" in line, line


def test_checkpoint_disk_full_keeps_the_previous_checkpoint(tmp_path):
    """DeepSpeed's writer raises ENOSPC in the middle of a save (one process, gloo): no COMPLETE for the new
    folder, the previous complete checkpoint stays, resume=auto picks it, the next save prunes the debris."""
    import subprocess
    import sys

    code = r'''
import errno, os, sys, json
from pathlib import Path
import torch, torch.distributed as dist
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
from accord_face.train.guard import free_port
os.environ["MASTER_PORT"] = str(free_port())
dist.init_process_group("gloo")
from accord_face.train import checkpoint as ckpt
from accord_face.train import loop
from accord_face.train.errors import user_error
root = Path(sys.argv[1]) / "checkpoints"

class Stream:
    def position(self): return {"epoch": 0, "consumed": 2, "skipped": {}}

class Cfg:
    class checkpointing: checkpoints_total_limit = 2
    class debug: kill_at = None

class Engine:
    full = False
    def save_checkpoint(self, path, tag, client_state, save_latest, exclude_frozen_parameters):
        d = Path(path) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"step": client_state["step"]}, d / "mp_rank_00_model_states.pt")
        if self.full:
            (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))

loop._export = lambda *a, **k: None
e = Engine()
loop._save(e, Cfg, None, None, Path(sys.argv[1]), 1, Stream())
e.full = True
try:
    loop._save(e, Cfg, None, None, Path(sys.argv[1]), 2, Stream())
except OSError as err:
    print("LINE", user_error(err))
print("AUTO", ckpt.find_resume(root, "auto").name)
e.full = False
loop._save(e, Cfg, None, None, Path(sys.argv[1]), 3, Stream())
print("LEFT", sorted(p.name for p in root.glob("step-*")))
'''
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line[:4] in ("LINE", "AUTO", "LEFT"))
    assert "step-00000002/zero_pp_rank_0_mp_rank_00_optim_states.pt: the disk is full" in lines["LINE"]
    assert lines["AUTO"] == "step-00000001"                       # never the half-written step 2
    assert lines["LEFT"] == "['step-00000001', 'step-00000003']"  # step 2's debris pruned by the next save
