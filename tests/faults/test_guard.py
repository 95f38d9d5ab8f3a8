"""The run guards on their own: output lock, launcher watchdog, stop signals, config comparison, strict JSON
lines, replayed-row truncation, checkpoint pruning, user-error lines."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accord_face.config import ConfigError
from accord_face.train import checkpoint as ckpt
from accord_face.train import guard
from accord_face.train.errors import user_error


def test_output_lock_refuses_a_second_holder_and_is_freed_when_the_holder_dies(tmp_path):
    code = "import sys, time; from pathlib import Path; from accord_face.train.guard import OutputLock; " \
           "lock = OutputLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {holder.pid}\)"):
            guard.OutputLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    guard.OutputLock(tmp_path).release()  # SIGKILL released it: no stale lock


def test_output_dir_whose_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="it or a parent is a file"):
        guard.check_output_dir(tmp_path / "file" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_dir(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="not writable|no permission"):
        guard.check_output_dir(tmp_path / "ro" / "run")


@pytest.mark.parametrize("kill", ["launcher", "grandparent"])
def test_a_rank_stops_when_its_launcher_dies(tmp_path, kill):
    """launcher (cmdline names torchrun) -> [middle launcher] -> rank with the watchdog; SIGKILL one launcher."""
    rank = ("import time, sys; from accord_face.train.guard import watch_launcher; "
            "t = watch_launcher(interval=0.1); print('watching' if t else 'none', flush=True); time.sleep(60)")
    middle = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {rank!r}, 'torchrun']); "
              "print(p.pid, flush=True); p.wait()")
    top = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {middle!r}, 'deepspeed']); "
           "p.wait()")
    launcher = subprocess.Popen([sys.executable, "-c", top if kill == "grandparent" else middle, "torchrun"],
                                stdout=subprocess.PIPE, text=True)
    try:
        lines = [launcher.stdout.readline().strip() for _ in range(2)]
        rank_pid = int(lines[0])
        assert lines[1] == "watching"
        launcher.kill()  # grandparent: the outer launcher dies, its child launcher lives on; the rank must stop
        deadline = time.time() + 20
        while time.time() < deadline and guard._alive(rank_pid):
            time.sleep(0.1)
        assert not guard._alive(rank_pid), "the rank outlived its launcher"
    finally:
        launcher.kill()
        launcher.wait()


def test_stop_flag_records_the_first_signal_and_a_second_one_acts_normally():
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda *a: seen.append("usr1"))
    try:
        stop = guard.StopFlag(signals=(signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1" and seen == []
        os.kill(os.getpid(), signal.SIGUSR1)       # the second: the previous handler again
        assert seen == ["usr1"]
        stop.restore()
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_config_changes_ignore_only_the_resumable_keys():
    a = {"max_steps": 10, "optim": {"lr": 1e-4}, "validation": {"every_n_steps": 5}, "seed": 0, "debug": {"x": 1}}
    b = {"max_steps": 20, "optim": {"lr": 1e-3}, "validation": {"every_n_steps": 1}, "seed": 1, "debug": {"x": 2}}
    assert guard.config_changes(a, b) == ["optim.lr: 0.0001 -> 0.001", "seed: 0 -> 1"]
    assert guard.config_changes(a, dict(a, max_steps=99)) == []


def test_json_lines_never_hold_bare_nan_and_replayed_rows_are_dropped(tmp_path):
    line = guard.json_line({"step": 1, "loss": float("nan"), "x": [float("inf"), 1.0]})
    assert json.loads(line) == {"step": 1, "loss": None, "x": [None, 1.0]} and "NaN" not in line
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(guard.json_line({"step": s}) for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert guard.truncate_jsonl(path, 2) == 3           # steps 3, 4 and the line cut by the kill
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert guard.truncate_jsonl(path, 2) == 0


def _ck(root: Path, step: int, complete: bool) -> Path:
    folder = root / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "w.pt").write_bytes(b"w")
    if complete:
        ckpt.mark_complete(folder, {"step": step})
    return folder


def test_prune_keeps_the_newest_complete_ones_and_removes_killed_saves(tmp_path):
    for step, complete in [(1, True), (2, False), (3, True), (4, True), (5, False)]:
        _ck(tmp_path, step, complete)
    ckpt.prune(tmp_path, 2, current="step-00000005")   # step 5 is being written now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004", "step-00000005"]
    ckpt.prune(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
    assert ckpt.find_resume(tmp_path, "latest").name == "step-00000004"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.find_resume(tmp_path, str(tmp_path / "nope"))


def test_user_error_lines_for_disk_and_permission_errors_and_none_for_bugs():
    full = user_error(OSError(errno.ENOSPC, "No space left on device", "/out/checkpoints/step-1/x.pt"))
    assert full.startswith("/out/checkpoints/step-1/x.pt: the disk is full") and "rerun" in full
    wrapped = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed: basic_ios::clear: iostream error")
    wrapped.__context__ = OSError(errno.EFBIG, "File too large")
    assert "larger than allowed" in user_error(wrapped)
    assert "disk is full" in user_error(RuntimeError("SafetensorError: No space left on device (os error 28)"))
    assert "\n" not in user_error(ConfigError("a\nb"))
    assert user_error(KeyError("bug")) is None
