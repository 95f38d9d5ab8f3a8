"""LoRA path: the four DDLoss prompts from metadata and from the fallbacks; config files."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from accord_face.config import load_config
from accord_face.lora.config import DataConfig, LoraTrainConfig
from accord_face.lora.prompts import PromptSet, build_references, describe_sources


def images(folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), "red").save(folder / name)
    return folder


def test_prompts_from_metadata(tmp_path):
    folder = images(tmp_path / "refs", ["a.png", "b.jpg"])
    rows = [{"file_name": "a.png", "joint": "a photo of sks backpack carried by a girl on a street",
             "target": "a photo of sks backpack", "context": "a photo of a girl on a street"},
            {"file_name": "b.jpg", "caption": "a dog in a park"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(reference_dir=str(folder), instance_prompt="a photo of sks backpack",
                     context_template="a photo of {caption}")
    refs = build_references(folder, cfg)
    assert [r.image.name for r in refs] == ["a.png", "b.jpg"]
    assert refs[0].prompts == PromptSet("a photo of sks backpack carried by a girl on a street",
                                        "a photo of sks backpack", "a photo of a girl on a street", "")
    assert refs[0].source == "metadata"
    assert refs[1].prompts == PromptSet("a photo of sks backpack with a dog in a park", "a photo of sks backpack",
                                        "a photo of a dog in a park", "")
    assert refs[1].source == "metadata caption"
    assert "1 from metadata" in describe_sources(refs)


def test_prompts_from_caption_files_and_templates_subject_and_style(tmp_path):
    folder = images(tmp_path / "refs", ["1.png", "2.png", "3.png"])
    (folder / "1.txt").write_text("  a girl on   a street\n")
    subject = DataConfig(reference_dir=str(folder), instance_prompt="a photo of sks backpack",
                         context_template="a photo of {caption}", caption_templates=["a beach", "a room"])
    refs = build_references(folder, subject)
    assert [r.source for r in refs] == ["caption file", "template", "template"]
    assert refs[0].prompts.joint == "a photo of sks backpack with a girl on a street"
    assert refs[0].prompts.context == "a photo of a girl on a street"
    # image i takes templates[i % n]: 2.png is index 1, 3.png index 2
    assert refs[1].prompts.context == "a photo of a room" and refs[2].prompts.context == "a photo of a beach"
    assert all(r.prompts.target == "a photo of sks backpack" and r.prompts.empty == "" for r in refs)

    style = DataConfig(reference_dir=str(folder), mode="style", instance_prompt="in sks style",
                       caption_templates=["a photo of a house"])
    refs = build_references(folder, style)
    assert refs[0].prompts == PromptSet("a girl on a street in sks style", "in sks style", "a girl on a street")
    assert refs[1].prompts == PromptSet("a photo of a house in sks style", "in sks style", "a photo of a house")


def test_image_without_caption_or_template_is_an_error_naming_the_file(tmp_path):
    folder = images(tmp_path / "refs", ["ok.png", "lonely.png"])
    (folder / "ok.txt").write_text("a tree")
    with pytest.raises(ValueError, match="lonely.png"):
        build_references(folder, DataConfig(reference_dir=str(folder)))


@pytest.mark.parametrize("row, match", [
    ({"file_name": "a.png", "joint": "x", "target": "y"}, "joint/target/context"),
    ({"file_name": "missing.png", "caption": "x"}, "missing.png"),
    ({"caption": "x"}, "file_name"),
])
def test_bad_metadata_rows_name_the_line(tmp_path, row, match):
    folder = images(tmp_path / "refs", ["a.png"])
    (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match) as err:
        build_references(folder, DataConfig(reference_dir=str(folder)))
    assert "metadata.jsonl:1" in str(err.value)


def test_learned_token_replaces_whole_words_only():
    p = PromptSet("a photo of sks backpack", "sks", "a photo of sksx")
    assert p.replace_word("sks", "<sks>") == PromptSet("a photo of <sks> backpack", "<sks>", "a photo of sksx")


@pytest.mark.parametrize("name", ["lora_tiny", "lora_subject", "lora_style"])
def test_shipped_configs_load(name):
    cfg = load_config(LoraTrainConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.max_steps > 0 and cfg.lora.rank > 0


def test_synthetic_sets_exercise_metadata_and_caption_files(tmp_path):
    from accord_face.lora.data import ReferenceSet, make_synthetic_references

    subject = make_synthetic_references(tmp_path / "subject", "subject", count=3, size=64)
    refs = build_references(subject, DataConfig(reference_dir=str(subject)))
    assert {r.source for r in refs} == {"metadata"} and len(refs) == 3
    assert refs[0].prompts == PromptSet("a photo of sks backpack with a tree", "a photo of sks backpack",
                                        "a photo of a tree")
    style = make_synthetic_references(tmp_path / "style", "style", count=4, size=64)
    cfg = DataConfig(reference_dir=str(style), mode="style", instance_prompt="in sks style")
    refs = build_references(style, cfg)
    assert {r.source for r in refs} == {"caption file"}
    assert sorted(r.prompts.joint for r in refs) == sorted(f"a photo of {c} in sks style"
                                                          for c in ("a house", "a tree", "a car", "a cat"))
    pixels, prompts = ReferenceSet(refs, 32, cfg, seed=0).batch(step=0, batch_size=2)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    again, _ = ReferenceSet(refs, 32, cfg, seed=0).batch(step=0, batch_size=2)
    assert torch.equal(pixels, again)  # sampling is a pure function of (seed, index): resumable


def test_script_reports_config_errors_with_the_key(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_lora_script",
                                                  Path(__file__).parents[1] / "scripts" / "train_lora.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = str(Path(__file__).parents[1] / "configs" / "lora_tiny.yaml")
    assert script.main(["--config", config, "lora.rnak=8"]) == 2
    assert "lora.rnak" in capsys.readouterr().err
    assert script.main(["--config", config, f"output_dir={tmp_path}", "data.synthetic=none"]) == 2
    assert "data.reference_dir" in capsys.readouterr().err
