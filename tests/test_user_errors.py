"""Bad input: one line naming cause and fix, exit code 2, and nothing loaded before the check."""

import json
import os
from pathlib import Path

import pytest
import torch

from accord_face.cli import main


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if any model or face analyzer starts loading."""
    import diffusers

    import accord_face.face

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input check")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", boom)
    monkeypatch.setattr(accord_face.face, "load_face_analyzer", boom)


@pytest.fixture
def run_dir(tmp_path):
    """A training-run layout: run/adapter (identity adapter), lora/ (LoRA), a photo, a photo folder."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "ip_adapter.safetensors").write_bytes(b"x")
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"format": "accord-face-ip-adapter", "version": 1, "base_model": "embedded:tiny", "cross_attention_dim": 32,
         "id_embed_dim": 128, "recognizer": {"name": "sface"}}))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    return tmp_path


def error_line(capsys, argv, command):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"accord-face {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def generate(*extra):
    return ["generate", "--prompt", "a person", "--steps", "1", *map(str, extra)]


@pytest.mark.parametrize("case, expect", [
    ("file", "is a file; pass the folder that holds it: --adapter {t}/run/adapter"),
    ("run", "is a training run folder; did you mean --adapter {t}/run/adapter?"),
    ("lora", "holds a LoRA, not an identity adapter; pass it as --lora {t}/lora"),
    ("typo", "no such adapter folder (did you mean {t}/run/adapter?)"),
])
def test_generate_adapter_path_mistakes(case, expect, run_dir, no_models, capsys):
    t = run_dir
    adapter = {"file": t / "run/adapter/ip_adapter.safetensors", "run": t / "run", "lora": t / "lora",
               "typo": t / "run/adaptr"}[case]
    line = error_line(capsys, generate("--adapter", adapter, "--face", t / "photos/a.jpg"), "generate")
    assert expect.format(t=t) in line


def test_generate_face_folder_and_lora_mistakes(run_dir, no_models, capsys):
    t = run_dir
    line = error_line(capsys, generate("--adapter", t / "run/adapter", "--face", t / "photos"), "generate")
    assert f"--face {t / 'photos'} is a folder; --face takes photo files" in line and "a.jpg" in line
    line = error_line(capsys, generate("--lora", t / "run"), "generate")
    assert "holds an identity adapter, not a LoRA; pass it as --adapter" in line
    line = error_line(capsys, generate("--lora", t / "lora", "--face", t / "photos/a.jpg"), "generate")
    assert "--face needs an identity adapter" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_generate_cuda_on_cpu_torch(run_dir, no_models, capsys):
    t = run_dir
    line = error_line(capsys, generate("--adapter", t / "run/adapter", "--face", t / "photos/a.jpg",
                                       "--device", "cuda"), "generate")
    assert "--device cuda" in line and "use --device cpu" in line


def test_unreachable_models_offline(run_dir, no_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = run_dir
    line = error_line(capsys, generate("--adapter", t / "run/adapter", "--face", t / "photos/a.jpg",
                                       "--pretrained", "nobody/not-cached-model"), "generate")
    assert "not in the hub cache, and HF_HUB_OFFLINE=1" in line
    (t / "prompts.txt").write_text("a person\n")
    line = error_line(capsys, ["evaluate", "--adapter", str(t / "run/adapter"), "--faces", str(t / "photos"),
                               "--prompts", str(t / "prompts.txt"), "--clip-model", "nobody/clip",
                               "--out", str(t / "ev")], "evaluate")
    assert "--clip-model nobody/clip" in line and "hub cache" in line


def test_evaluate_file_folder_mistakes(run_dir, no_models, capsys):
    t = run_dir
    base = ["evaluate", "--adapter", str(t / "run/adapter"), "--out", str(t / "ev")]
    line = error_line(capsys, base + ["--faces", str(t / "photos/a.jpg"), "--prompts", str(t / "p.txt")], "evaluate")
    assert "--faces" in line and "is a file; --faces takes a folder" in line
    line = error_line(capsys, base + ["--faces", str(t / "photos"), "--prompts", str(t / "photos")], "evaluate")
    assert "--prompts" in line and "is a folder; --prompts takes a text file" in line
    line = error_line(capsys, ["evaluate", "--faces", str(t / "photos")], "evaluate")
    assert "missing required flag(s): --adapter, --prompts" in line


def test_misspelt_flag_and_command_get_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "x", "--adaptr", "y"])
    assert exc.value.code == 2 and "did you mean '--adapter'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["generat"])
    assert exc.value.code == 2 and "did you mean 'generate'?" in capsys.readouterr().err


def test_config_errors_are_one_line_with_a_suggestion(tmp_path):
    from accord_face.config import ConfigError, load_config
    from accord_face.lora import LoraTrainConfig

    bad = tmp_path / "tab.yaml"
    bad.write_text("max_steps: 2\nlora:\n\trank: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(LoraTrainConfig, bad)
    assert "\n" not in str(exc.value) and f"{bad}, line 3" in str(exc.value) and "tabs" in str(exc.value)
    with pytest.raises(ConfigError, match=r"did you mean 'lora.rank'\?"):
        load_config(LoraTrainConfig, None, ["lora.rnk=2"])
    ok = tmp_path / "ok.yaml"
    ok.write_text("max_steps: 0\n")
    with pytest.raises(ConfigError) as exc:
        load_config(LoraTrainConfig, ok)
    assert "<root>" not in str(exc.value) and str(ok) in str(exc.value)


def test_export_command_says_why_an_adapter_is_diffusers_only(tiny_pipeline_dir, tmp_path, capsys):
    from test_pipeline_helpers import export_test_adapter

    adapter = export_test_adapter(tiny_pipeline_dir, tmp_path / "a", id_dim=128)
    line = error_line(capsys, ["export", "--adapter", str(adapter), "--format", "comfyui"], "export")
    assert "512-d ArcFace" in line and "128-d" in line
    line = error_line(capsys, ["export", "--adapter", str(adapter), "--format", "kohya"], "export")
    assert "LoRA layout" in line
    assert not any(p.name.startswith("ip-adapter") for p in Path(adapter).iterdir())


def _metrics_dir(path: Path, seeds, clip_t):
    path.mkdir()
    (path / "metrics.json").write_text(json.dumps({"schema_version": 1, "overall": {"clip_t": clip_t},
                                                   "per_scale": [], "per_prompt": []}))
    (path / "settings.json").write_text(json.dumps({"seeds": seeds, "prompt_list": ["a"], "adapter": str(path),
                                                    "identity_photos": {"x": []}}))
    return str(path)


def test_compare_names_differing_settings_and_refuses_other_seeds(tmp_path, capsys):
    a = _metrics_dir(tmp_path / "a", [0], 0.3)
    b = _metrics_dir(tmp_path / "b", [0, 1], 0.4)
    line = error_line(capsys, ["evaluate", "--compare", a, b], "evaluate")
    assert "different seeds" in line and "--force" in line
    assert main(["evaluate", "--compare", a, b, "--force"]) == 0
    out = capsys.readouterr().out
    assert "setting seeds differs: A=[0] B=[0, 1]" in out and "setting adapter differs" in out and "+0.1" in out
    c = _metrics_dir(tmp_path / "c", [0], 0.5)
    assert main(["evaluate", "--compare", a, c]) == 0   # only the adapter differs: deltas are meaningful
    assert "seeds differs" not in capsys.readouterr().out


def test_encoder_trainer_refuses_uncached_hub_ids_before_loading(tmp_path, monkeypatch, no_models):
    from accord_face.config import ConfigError, load_config
    from accord_face.train import TrainConfig
    from accord_face.train.config import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "s-000000.tar").write_bytes(b"")
    for key in ("pretrained_model", "clip_model"):
        cfg = load_config(TrainConfig, None, [f"shards={tmp_path / 'shards'}", f"{key}=nobody/not-cached"])
        with pytest.raises(ConfigError, match=f"{key} nobody/not-cached: not a local folder and not in the hub cache"):
            preflight(cfg)
