"""`accord-face generate` and accord_face.pipeline on the tiny pipeline with a trainer-exported adapter."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from accord_face.cli import main
from accord_face.face import load_face_analyzer
from accord_face.pipeline import FaceIDGenerator, GenerateError, identity_embedding
from test_pipeline_helpers import as_array, astronaut, export_test_adapter, grace_hopper, no_face_photo, two_faces_photo


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    paths = {}
    for name, make in [("grace", grace_hopper), ("astronaut", astronaut), ("coffee", no_face_photo),
                       ("two", two_faces_photo)]:
        paths[name] = root / f"{name}.jpg"
        make().save(paths[name], quality=95)
    paths["grace_flip"] = root / "grace_flip.png"
    grace_hopper().transpose(0).save(paths["grace_flip"])  # 0 = FLIP_LEFT_RIGHT
    return paths


@pytest.fixture(scope="module")
def adapter_dir(tiny_pipeline_dir, tmp_path_factory):
    return export_test_adapter(tiny_pipeline_dir, tmp_path_factory.mktemp("adapters") / "sface")


@pytest.fixture(scope="module")
def analyzer():
    return load_face_analyzer("opencv-zoo")


@pytest.fixture(scope="module")
def generator(adapter_dir):
    return FaceIDGenerator(adapter_dir, device="cpu")


def test_generate_cli_end_to_end_matches_plain_diffusers(adapter_dir, photos, analyzer, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "gen"
    argv = ["generate", "--adapter", str(adapter_dir), "--face", str(photos["grace"]), "--prompt",
            "a photo of a person", "--prompt", "a painting of a woman", "--num-images", "2", "--seed", "5",
            "--steps", "2", "--scale", "0.8", "--out", str(out)]
    assert main(argv) == 0
    info = json.loads((out / "generate.json").read_text())
    assert [(r["file"], r["seed"]) for r in info["images"]] == [
        ("p00_seed5.png", 5), ("p00_seed6.png", 6), ("p01_seed5.png", 5), ("p01_seed6.png", 6)]
    assert info["settings"]["scale"] == 0.8 and info["settings"]["steps"] == 2
    assert info["base_model"] == tiny_pipeline_dir and info["face_analyzer"]["recognizer"] == "sface"
    assert info["reference_photos"][0]["faces"] == 1
    assert Image.open(out / "grid.png").size == (2 * 64, 2 * 64)

    # The same image through stock diffusers, with the embedding and CFG negative built here.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_ip_adapter(str(adapter_dir), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    emb = torch.from_numpy(analyzer.analyze(np.asarray(Image.open(photos["grace"])))[0].embedding).reshape(1, 1, -1)
    refs = pipe("a painting of a woman", ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb), emb])],
                num_inference_steps=2, guidance_scale=5.0, num_images_per_prompt=2, height=64, width=64,
                generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    for ref, name in zip(refs, ["p01_seed5.png", "p01_seed6.png"]):
        assert np.abs(as_array(ref) - as_array(Image.open(out / name))).max() <= 1


def test_same_seed_identical_and_identity_and_scale_matter(generator, analyzer, photos):
    e_grace, _ = identity_embedding(analyzer, [photos["grace"]])
    e_astro, _ = identity_embedding(analyzer, [photos["astronaut"]])
    kw = dict(seeds=[3], steps=2, guidance=5.0)
    a = as_array(generator.generate(e_grace, "a photo of a person", **kw)[0])
    b = as_array(generator.generate(e_grace, "a photo of a person", **kw)[0])
    c = as_array(generator.generate(e_astro, "a photo of a person", **kw)[0])
    d = as_array(generator.generate(e_grace, "a photo of a person", **{**kw, "seeds": [4]})[0])
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1.0 and np.abs(a - d).mean() > 1.0
    # scale 0 switches the identity branch off: both identities give the same image
    z1 = as_array(generator.generate(e_grace, "a photo of a person", scale=0.0, **kw)[0])
    z2 = as_array(generator.generate(e_astro, "a photo of a person", scale=0.0, **kw)[0])
    assert np.array_equal(z1, z2) and not np.array_equal(z1, a)


def test_batched_pairs_match_one_call_per_pair(generator, analyzer, photos):
    e, _ = identity_embedding(analyzer, [photos["grace"]])
    kw = dict(steps=2, guidance=5.0, scale=0.7)
    pair = [as_array(im) for im in generator.generate_pairs(e, ["a photo of a person", "a painting"], [3, 4], **kw)]
    one = [as_array(generator.generate(e, p, seeds=[s], **kw)[0]) for p, s in [("a photo of a person", 3),
                                                                              ("a painting", 4)]]
    for a, b in zip(pair, one):
        assert np.abs(a - b).mean() < 0.5  # batch composition changes float rounding only
    assert np.abs(pair[0] - pair[1]).mean() > 1.0
    with pytest.raises(ValueError, match="2 prompts for 1 seeds"):
        generator.generate_pairs(e, ["a", "b"], [0])


def test_several_photos_give_normalised_mean(analyzer, photos):
    emb, notes = identity_embedding(analyzer, [photos["grace"], photos["grace_flip"]])
    e1, e2 = (analyzer.analyze(np.asarray(Image.open(photos[k]).convert("RGB")))[0].embedding
              for k in ("grace", "grace_flip"))
    e1, e2 = e1 / np.linalg.norm(e1), e2 / np.linalg.norm(e2)
    expected = (e1 + e2) / np.linalg.norm(e1 + e2)
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert [n["faces"] for n in notes] == [1, 1]


def test_several_faces_use_largest_and_warn(analyzer, photos, caplog):
    with caplog.at_level(logging.WARNING, logger="accord_face.pipeline"):
        emb, notes = identity_embedding(analyzer, [photos["two"]])
    assert f"{photos['two']}: 2 faces found; using the largest" in caplog.text
    grace, _ = identity_embedding(analyzer, [photos["grace"]])
    astro, _ = identity_embedding(analyzer, [photos["astronaut"]])
    assert float(emb @ grace) > 0.9 > 0.5 > float(emb @ astro)
    assert notes[0]["faces"] == 2


def _run_cli_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("accord-face generate: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def _generate_argv(adapter, face, out):
    return ["generate", "--adapter", str(adapter), "--face", str(face), "--prompt", "a person", "--steps", "2",
            "--out", str(out)]


def test_error_missing_files(adapter_dir, photos, tmp_path, capsys):
    msg = _run_cli_error(capsys, _generate_argv(adapter_dir, tmp_path / "nope.jpg", tmp_path / "o"))
    assert f"--face {tmp_path / 'nope.jpg'}: no such photo" in msg
    msg = _run_cli_error(capsys, _generate_argv(tmp_path / "no_adapter", photos["grace"], tmp_path / "o"))
    assert f"--adapter {tmp_path / 'no_adapter'}: no such adapter folder" in msg
    (tmp_path / "empty").mkdir()
    msg = _run_cli_error(capsys, _generate_argv(tmp_path / "empty", photos["grace"], tmp_path / "o"))
    assert "has no ip_adapter.safetensors" in msg


def test_error_no_face_names_the_file(adapter_dir, photos, tmp_path, capsys):
    msg = _run_cli_error(capsys, _generate_argv(adapter_dir, photos["coffee"], tmp_path / "o"))
    assert f"no face found in {photos['coffee']}" in msg
    assert not (tmp_path / "o" / "generate.json").exists()


def test_error_adapter_for_another_base(tiny_pipeline_dir, photos, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48,
                                attention_head_dim=8)
    adapter = export_test_adapter(tiny_pipeline_dir, tmp_path / "other", unet=unet, base_model="other/base-48")
    msg = _run_cli_error(capsys, _generate_argv(adapter, photos["grace"], tmp_path / "o") +
                         ["--pretrained", tiny_pipeline_dir])
    assert "adapter/base mismatch" in msg and "cross-attention dim 48" in msg and "has 32" in msg


def test_error_recognizer_mismatch(tiny_pipeline_dir, photos, tmp_path, capsys):
    rec = {"name": "arcface", "backend": "insightface", "embedding_dim": 512}
    adapter = export_test_adapter(tiny_pipeline_dir, tmp_path / "arc", id_dim=512, recognizer=rec)
    # the recorded insightface pack is not installed here: a one-line error, not a traceback
    msg = _run_cli_error(capsys, _generate_argv(adapter, photos["grace"], tmp_path / "o")
                         + ["--face-model-root", str(tmp_path / "no_models")])
    assert "cannot load the face analyzer 'insightface'" in msg
    # forcing the 128-d SFace analyzer onto a 512-d adapter
    msg = _run_cli_error(capsys, _generate_argv(adapter, photos["grace"], tmp_path / "o")
                         + ["--face-backend", "opencv-zoo"])
    assert "recognizer mismatch" in msg and "512-d" in msg and "128-d" in msg


def test_generate_error_is_a_runtime_error():
    assert issubclass(GenerateError, RuntimeError)


def test_base_model_defaults_to_the_recorded_one(tiny_pipeline_dir, tmp_path):
    from accord_face.pipeline import resolve_base_model

    recorded = {"base_model": "embedded:tiny", "base_model_path": str(tmp_path / "moved-away")}
    assert resolve_base_model(recorded, None) == tiny_pipeline_dir  # embedded name -> the cached build
    assert resolve_base_model({**recorded, "base_model_path": tiny_pipeline_dir}, None) == tiny_pipeline_dir
    assert resolve_base_model(recorded, "some/hub-id") == "some/hub-id"
    with pytest.raises(GenerateError, match="records no base model; pass --pretrained"):
        resolve_base_model({}, None)
