"""Untrusted files: crafted pickles as a checkpoint file, a testbed asset and a shard member are refused
and run nothing (the payload's marker file never appears); checkpoint hashes catch changed files."""

from __future__ import annotations

import io
import logging
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds

from payload import Payload, pickle_bytes, write_torch_payload


def test_the_payload_does_run_code_when_unpickled(tmp_path):
    """Control: the crafted file is live, so 'the marker never appears' below means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle_bytes(marker))
    assert marker.exists()


def test_checkpoint_loader_refuses_a_crafted_pickle_and_runs_nothing(tmp_path):
    from accord_face.train.checkpoint import CheckpointError, safe_torch_load

    marker = tmp_path / "ran"
    path = write_torch_payload(tmp_path / "step-00000002" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: refused, it needs posix\.system"):
        safe_torch_load(str(path))
    assert not marker.exists()


def test_checkpoint_loader_reads_deepspeed_zero_state_and_plain_rng(tmp_path):
    """What the trainer saves: ZeRO optimizer state (DeepSpeed's enum / fragment / loss-scaler values) and the
    RNG state as plain lists round-trip through the weights-only loader."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from accord_face.train.checkpoint import safe_torch_load
    from accord_face.train.loop import _rng_state, _set_rng_state

    np.random.seed(5)
    state = _rng_state()
    want = np.random.rand(3)
    sd = {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                   "param_slice_mappings": [{"w": fragment_address(numel=4, start=2)}],
                                   "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(3)}}}},
          "rng": [state]}
    torch.save(sd, tmp_path / "optim.pt")
    back = safe_torch_load(str(tmp_path / "optim.pt"))
    assert back["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.gradients
    assert back["optimizer_state_dict"]["param_slice_mappings"][0]["w"].start == 2
    _set_rng_state(back["rng"][0])
    np.testing.assert_array_equal(np.random.rand(3), want)


def test_verify_refuses_changed_added_and_missing_files(tmp_path):
    from accord_face.train.checkpoint import CheckpointError, mark_complete, verify

    folder = tmp_path / "step-00000004"
    folder.mkdir()
    (folder / "a.pt").write_bytes(b"a" * 100)
    (folder / "b.pt").write_bytes(b"b" * 10)
    mark_complete(folder, {"step": 4, "world_size": 1})
    assert verify(folder)["step"] == 4 and set(verify(folder)["files"]) == {"a.pt", "b.pt"}
    (folder / "a.pt").write_bytes(b"a" * 99 + b"X")       # same size, other content
    with pytest.raises(CheckpointError, match=r"a\.pt differs from the sha256"):
        verify(folder)
    (folder / "a.pt").write_bytes(b"a" * 100)
    (folder / "evil.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"evil\.pt was added after"):
        verify(folder)
    (folder / "evil.pt").unlink()
    (folder / "b.pt").unlink()
    with pytest.raises(CheckpointError, match=r"b\.pt is missing"):
        verify(folder)


def test_testbed_base_checkpoint_and_assets_are_loaded_weights_only(tmp_path):
    from accord_face.testbed.base import load_weights, train_base
    from accord_face.testbed.config import BaseModelConfig

    marker = tmp_path / "ran"
    cache = tmp_path / "cache"
    write_torch_payload(cache / "base_ckpt.pt", marker)     # the resumable training checkpoint
    with pytest.raises(ValueError, match=r"base_ckpt\.pt: refused, not a weights-only file"):
        train_base(BaseModelConfig(steps=2, batch_size=2, checkpoint_every=1), cache)
    write_torch_payload(cache / "base_model.safetensors", marker)    # the cached / committed model
    with pytest.raises(ValueError, match=r"base_model\.safetensors: not a safetensors file"):
        train_base(BaseModelConfig(steps=2, batch_size=2), cache)
    assert not marker.exists()
    # what train_base itself writes (optimizer state, numpy PCG64 state with 128-bit ints) loads back
    rng = np.random.default_rng(3)
    torch.save({"opt": torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]).state_dict(),
                "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "step": 7}, tmp_path / "ok.pt")
    assert load_weights(tmp_path / "ok.pt")["rng"]["state"] == rng.bit_generator.state["state"]


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_pickle_shard_members_are_refused_counted_and_run_nothing(tmp_path, caplog):
    from PIL import Image

    from accord_face.data import build_dataset

    marker = tmp_path / "ran"
    img = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img, format="PNG")
    good = np.ones(8, np.float32)
    evil_array = np.empty(1, dtype=object)
    evil_array[0] = Payload(marker)  # np.save pickles object arrays: the .npy would run the payload
    with wds.TarWriter(str(tmp_path / "faces-000000.tar")) as tw:
        tw.write({"__key__": "ok", "png": img.getvalue(), "sface.npy": _npy(good), "txt": "a"})
        tw.write({"__key__": "objnpy", "png": img.getvalue(), "sface.npy": _npy(evil_array), "txt": "b"})
        tw.write({"__key__": "pickled", "png": img.getvalue(), "sface.npy": _npy(good), "txt": "c",
                  "extra.pickle": pickle_bytes(marker)})
        tw.write({"__key__": "pyd", "png": img.getvalue(), "sface.npy": _npy(good), "txt": "d",
                  "meta.pyd": pickle_bytes(marker)})
    ds = build_dataset(str(tmp_path), resolution=16, embedding_key="sface.npy", shuffle_buffer=0, embedding_dim=8)
    with caplog.at_level(logging.WARNING, logger="accord_face.data"):
        keys = [s["__key__"] for s in ds]
    assert keys == ["ok"]
    assert ds.stats.kinds["bad_sample"] == 3
    assert "key objnpy" in caplog.text and "not a plain .npy array" in caplog.text
    assert "key pickled" in caplog.text and "pickle members ['extra.pickle'] are refused" in caplog.text
    assert "key pyd" in caplog.text and "faces-000000.tar" in caplog.text
    assert not marker.exists()


def _unsafe_calls(source: str) -> list[str]:
    """Calls that can unpickle: torch.load without weights_only=True, np.load(allow_pickle=True), pickle.load(s)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name == "torch.load" and kw.get("weights_only") != "True" or \
                name.endswith("np.load") and kw.get("allow_pickle") == "True" or \
                name in ("pickle.load", "pickle.loads", "torch.serialization.load"):
            found.append(f"line {node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_the_unsafe_call_finder_finds_unsafe_calls():
    assert len(_unsafe_calls("torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(b, allow_pickle=True)\n"
                             "pickle.loads(b)\ntorch.load(p, weights_only=True)\n")) == 4


def test_no_unsafe_loads_in_the_code():
    """Every torch.load in the package is weights-only; nothing unpickles or allows pickled arrays."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = {str(p.relative_to(root)): bad for p in [*(root / "accord_face").rglob("*.py"),
                                                         *(root / "data_pipelines").rglob("*.py")]
                 if (bad := _unsafe_calls(p.read_text()))}
    assert offenders == {}
