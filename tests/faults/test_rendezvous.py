"""Two runs on one machine: a lone training process needs no rendezvous port; a launcher whose port is taken
gets one line naming the port and --master_port, exit 2.

The end-to-end runs (two trainings side by side, the deepspeed launcher on a taken port) take 30-60 s on
2 cores and are marked heavy: ``pytest -m heavy tests/faults/test_rendezvous.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import trainrun
from shards_util import write_shards

INIT = ("import torch.distributed as d\n"
        "from accord_face.train.loop import _init_distributed\n"
        "from accord_face.config import ConfigError\n"
        "try:\n"
        "    _init_distributed('gloo')\n"
        "except ConfigError as err:\n"
        "    print('LINE', err); raise SystemExit(2)\n"
        "d.barrier(); print('WORLD', d.get_world_size())\n")


@pytest.fixture
def busy_port():
    """A port some other run holds (listening), as 29500 is while another training runs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def _init(**env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", INIT], env=trainrun.env(**env), cwd=trainrun.ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_lone_processes_start_side_by_side_even_on_a_taken_master_port(busy_port):
    procs = [_init(MASTER_PORT=busy_port) for _ in range(2)]   # no launcher: RANK / WORLD_SIZE unset
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "WORLD 1" in out, err[-3000:]


def test_a_launched_rank_on_a_taken_port_is_one_line_naming_it(busy_port):
    p = _init(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=busy_port)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, (out, err[-3000:])
    line = next(ln for ln in out.splitlines() if ln.startswith("LINE "))
    assert f"127.0.0.1:{busy_port} is in use" in line and "--master_port" in line, line


@pytest.mark.heavy
def test_two_single_process_trainings_at_once_both_finish(tiny_pipeline_dir, tmp_path, busy_port):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=2)
    extra = ["max_steps=2", "validation.enabled=false"]
    procs = [subprocess.Popen(trainrun.command(tiny_pipeline_dir, shards, tmp_path / f"run{i}", extra),
                              env=trainrun.env(MASTER_PORT=busy_port), cwd=trainrun.ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
        assert "done: 2 steps" in out
        assert (tmp_path / f"run{i}" / "adapter" / "ip_adapter.safetensors").is_file()


@pytest.mark.heavy
def test_deepspeed_launcher_on_a_taken_port_is_one_line_exit_2(tiny_pipeline_dir, tmp_path, busy_port):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=2)
    script = trainrun.command(tiny_pipeline_dir, shards, tmp_path / "run", ["max_steps=1"])[1:]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(busy_port)] + script
    proc = subprocess.run(cmd, env=trainrun.env(), cwd=trainrun.ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "rendezvous port" in ln]
    assert len(lines) == 1 and f"127.0.0.1:{busy_port} is in use" in lines[0] and "--master_port" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert os.path.isdir(tmp_path / "run")   # the output folder was locked and released, nothing else written
