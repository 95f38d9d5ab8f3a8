"""The adapter export window: the folder always holds a loadable adapter, temp folders are cleaned,
permissions follow the umask (0755 / 0644), a kill -9 between 'written' and 'swapped in' loses nothing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from accord_face import adapter


class _Unet(nn.Module):
    """Just enough of a UNet for adapter_state_dict: two cross-attention processors with IP weights."""

    def __init__(self, value: float):
        super().__init__()
        self.procs = {}
        for name in ("down.attn2.processor", "up.attn2.processor"):
            proc = nn.Module()
            proc.to_k_ip = nn.ModuleList([nn.Linear(4, 4, bias=False)])
            proc.to_v_ip = nn.ModuleList([nn.Linear(4, 4, bias=False)])
            nn.init.constant_(proc.to_k_ip[0].weight, value)
            nn.init.constant_(proc.to_v_ip[0].weight, value)
            self.procs[name] = proc

    @property
    def attn_processors(self):
        return self.procs


def _export(folder: Path, value: float, **kw) -> Path:
    enc = nn.Linear(2, 2)
    nn.init.constant_(enc.weight, value)
    return adapter.export_adapter(folder, enc, _Unet(value), {"train_steps": int(value)}, **kw)


def _value(folder: Path) -> float:
    return float(adapter.load_adapter_state_dict(folder)["ip_adapter.1.to_k_ip.weight"][0, 0])


def test_export_replaces_with_normal_permissions_and_no_leftovers(tmp_path):
    old = os.umask(0o022)
    try:
        _export(tmp_path / "adapter", 1.0)
        _export(tmp_path / "adapter", 2.0)
    finally:
        os.umask(old)
    assert _value(tmp_path / "adapter") == 2.0
    assert adapter.load_adapter_config(tmp_path / "adapter")["train_steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]          # no .adapter.tmp.* / .old
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "adapter").iterdir()} == {0o644}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "per-file-replace"])
def test_a_reader_never_finds_the_adapter_missing_or_partial(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(adapter, "_exchange", lambda a, b: False)
    folder = tmp_path / "adapter"
    _export(folder, 1.0)
    stop, failures, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                v = _value(folder)
                assert v in (float(i) for i in range(1, 40))
                reads[0] += 1
            except Exception as err:  # noqa: BLE001
                failures.append(repr(err))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(2, 40):
        _export(folder, float(i))
    stop.set()
    t.join()
    assert failures == [] and reads[0] > 0
    assert _value(folder) == 39.0


def test_kill_between_written_and_swapped_keeps_the_old_adapter_and_the_next_export_cleans_up(tmp_path):
    folder = tmp_path / "adapter"
    _export(folder, 1.0)
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "import test_export_window as t; "
            "t._export(Path(sys.argv[1]), 5.0, before_swap=lambda: os.kill(os.getpid(), signal.SIGKILL))")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.tmp.")]
    assert len(stale) == 1 and (stale[0] / adapter.WEIGHT_NAME).is_file()   # the dead exporter's new files
    assert _value(folder) == 1.0                                             # the old adapter, whole
    _export(folder, 2.0)
    assert _value(folder) == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_disk_full_while_writing_the_weights_keeps_the_old_adapter(tmp_path, monkeypatch):
    """An injected writer: half the file, then ENOSPC (as safetensors raises it)."""
    import errno

    import safetensors.torch

    folder = tmp_path / "adapter"
    _export(folder, 1.0)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left") as info:
        _export(folder, 3.0)
    assert ".adapter.tmp." in info.value.filename                     # the error names the file
    assert _value(folder) == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    torch.testing.assert_close(adapter.load_adapter_state_dict(folder)["image_proj.weight"], torch.ones(2, 2))
    monkeypatch.undo()
    _export(folder, 3.0)                                               # space freed: the rerun completes
    assert _value(folder) == 3.0


def test_lora_folder_swap_has_no_gap_and_normal_permissions(tmp_path):
    """The LoRA trainer's export and checkpoint folders go through the same swap."""
    from accord_face.lora.export import _replace_dir, _temp_dir

    folder = tmp_path / "lora"
    stop, failures = threading.Event(), []

    def write(i: int) -> None:
        tmp = _temp_dir(folder)
        (tmp / "pytorch_lora_weights.safetensors").write_text(str(i))
        _replace_dir(tmp, folder)
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)

    write(0)

    def reader():
        while not stop.is_set():
            try:
                int((folder / "pytorch_lora_weights.safetensors").read_text())
            except Exception as err:  # noqa: BLE001
                failures.append(repr(err))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(1, 40):
        write(i)
    stop.set()
    t.join()
    assert failures == [] and (folder / "pytorch_lora_weights.safetensors").read_text() == "39"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
