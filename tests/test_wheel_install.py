"""Both trainers run from a wheel installed into a fresh venv (no checkout on the path, configs from the wheel).

Heavy (a wheel build, a venv, two short trainings): pytest -m heavy tests/test_wheel_install.py
The venv gets the test environment's dependencies through a .pth line (offline: nothing is
downloaded); the project itself comes only from the wheel (asserted).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def run(cmd, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("accord_face", "data_pipelines", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
        tmp)
    wheel = next((tmp / "dist").glob("accord_face-*.whl"))
    env_dir = tmp / "venv"
    run([sys.executable, "-m", "venv", env_dir], tmp)
    site = Path(run([env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    tmp).strip().splitlines()[-1])
    (site / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([env_dir / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], tmp)
    where = run([env_dir / "bin" / "python", "-c", "import accord_face; print(accord_face.__file__)"], tmp)
    assert str(env_dir) in where and str(ROOT) not in where
    return env_dir, tmp


def test_train_lora_from_the_wheel(venv):
    env_dir, tmp = venv
    out = tmp / "lora-run"
    run([env_dir / "bin" / "accord-face", "train-lora", "--config", "lora_tiny", "--output_dir", out,
         "--max_train_steps", "1", "data.synthetic_count=2", "validation.num_inference_steps=1",
         "validation.num_validation_images=1"], tmp)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_train_encoder_from_the_wheel(venv):
    env_dir, tmp = venv
    py, cli = env_dir / "bin" / "python", env_dir / "bin" / "accord-face"
    run([py, "-c", f"from data_pipelines.embedded import write_embedded_photos as w; w({str(tmp / 'photos')!r})"],
        tmp)
    run([cli, "prepare-shards", "--input", tmp / "photos", "--output", tmp / "shards", "--no-progress"], tmp)
    out = tmp / "enc-run"
    run([cli, "train-encoder", "--config", "tiny", f"shards={tmp / 'shards'}", "--output_dir", out,
         "--max_train_steps", "1", "validation.enabled=false", "checkpointing.checkpointing_steps=0"], tmp)
    assert (out / "adapter" / "ip_adapter.safetensors").is_file()
