"""``--distributor ray`` on a local Ray with 2 CPUs: same samples as a local run; a worker killed
mid-partition loses nothing committed and the rerun completes. Skipped when Ray (the ``ray`` extra)
is not installed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds

from data_pipelines.embedded import write_embedded_photos
from data_pipelines.journal import SettingsMismatch, file_sha256
from data_pipelines.partitions import PARTITIONS_DIR, read_partition
from data_pipelines.prepare import PrepareConfig, prepare_shards
from test_shards import messy_folder, shard_digests, skip_reasons  # noqa: F401  (messy_folder is a fixture)

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=128 * 1024 ** 2)
    yield
    ray.shutdown()


def _config(inp, out, **kw) -> PrepareConfig:
    base = dict(input=str(inp), output=str(out), resolution=64, shard_size=3, progress=False)
    base.update(kw)
    return PrepareConfig(**base)


def test_ray_writes_the_same_samples_as_local(local_ray, messy_folder, tmp_path):  # noqa: F811
    folder, good, bad = messy_folder
    copy = tmp_path / "photos"  # the same photos (sources are relative paths), grown at the end
    shutil.copytree(folder, copy, symlinks=True)
    local = prepare_shards(_config(folder, tmp_path / "local"))
    dist = prepare_shards(_config(copy, tmp_path / "ray", distributor="ray", partition_size=5))
    assert dist["partitions"] == {"done_before": 0, "run_now": 4}  # 16 photos / 5
    assert local["num_samples"] == dist["num_samples"] == len(good)
    assert shard_digests(tmp_path / "local") == shard_digests(tmp_path / "ray")
    assert skip_reasons(tmp_path / "local") == skip_reasons(tmp_path / "ray")
    m_local, m_ray = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("local", "ray"))
    assert m_ray["skipped_by_reason"] == m_local["skipped_by_reason"] and m_ray["distributor"] == "ray"
    for shard in m_ray["shards"]:
        assert file_sha256(tmp_path / "ray" / shard["name"]) == shard["sha256"]
    # Rerun: every partition is complete, so Ray is not even needed; mixing distributors is refused.
    again = prepare_shards(_config(copy, tmp_path / "ray", distributor="ray", partition_size=5))
    assert again["processed_now"] == 0 and again["partitions"] == {"done_before": 4, "run_now": 0}
    with pytest.raises(SettingsMismatch, match="--distributor ray"):
        prepare_shards(_config(copy, tmp_path / "ray"))
    with pytest.raises(SettingsMismatch, match="--distributor local"):
        prepare_shards(_config(folder, tmp_path / "local", distributor="ray"))
    with pytest.raises(SettingsMismatch, match="partition_size"):
        prepare_shards(_config(copy, tmp_path / "ray", distributor="ray", partition_size=6))
    # A photo added in front shifts every partition: refused (it would redo inputs done in another one).
    shutil.copy(copy / "hopper.jpg", copy / "aaa_first.jpg")
    with pytest.raises(SettingsMismatch, match="partition p000000 .* other inputs"):
        prepare_shards(_config(copy, tmp_path / "ray", distributor="ray", partition_size=5))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_bytes().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _partition_workers() -> list[int]:
    """Ray worker processes started by this test process that are running a partition task now."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_partition_task"):
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_worker_killed_mid_partition_keeps_committed_shards_and_rerun_completes(local_ray, tmp_path):
    photos = write_embedded_photos(tmp_path / "photos")
    src = tmp_path / "src"  # img2dataset-like: 3 input shards of 8 photos -> 3 partitions
    src.mkdir()
    jpgs = sorted(photos.glob("*.jpg"))
    for s in range(3):
        with wds.TarWriter(str(src / f"{s:05d}.tar")) as tw:
            for i in range(8):
                tw.write({"__key__": f"{s:05d}{i:04d}", "jpg": jpgs[(s * 8 + i) % len(jpgs)].read_bytes(),
                          "txt": f"photo {s}-{i}"})
    out = tmp_path / "ray"
    # threads_per_worker=2: each task takes both CPUs, so exactly one partition runs at a time.
    cfg = _config(src, out, shard_size=2, distributor="ray", ray_retries=0, threads_per_worker=2, batch_size=2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            prepare_shards(cfg)
        except BaseException as err:  # noqa: BLE001 - inspected below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    killed, committed = None, {}
    deadline = time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for journal in sorted((out / PARTITIONS_DIR).glob("p*.jsonl")):
            info = read_partition(journal)
            workers = _partition_workers()
            if info["shards"] and not info["complete"] and len(workers) == 1:
                os.kill(workers[0], signal.SIGKILL)  # the worker process, mid-partition
                killed = journal.stem
                committed = {s["name"]: s["sha256"] for s in read_partition(journal)["shards"]}
                break
        time.sleep(0.005)
    thread.join(timeout=180)
    assert killed is not None, "no partition was caught mid-way"
    assert errors and "partition(s) failed" in str(errors[0]) and killed in str(errors[0]), errors
    assert committed and all(file_sha256(out / n) == h for n, h in committed.items())  # nothing committed lost

    rerun = prepare_shards(cfg)
    assert rerun["partitions"] == {"done_before": 2, "run_now": 1} and rerun["resumed_inputs"] >= 2
    assert rerun["num_samples"] == 24 and not list(out.glob(".*.tmp"))
    assert all(file_sha256(out / n) == h for n, h in committed.items())
    prepare_shards(_config(src, tmp_path / "local", shard_size=2))
    assert shard_digests(out) == shard_digests(tmp_path / "local")  # each input exactly once, same content
