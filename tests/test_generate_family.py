"""``accord-face generate`` for FaceID-Plus-V2 (+ identity LoRA) and Portrait, against plain diffusers calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from accord_face import adapter
from accord_face.cli import main
from accord_face.encoder import build_encoder
from accord_face.face import align_face, load_face_analyzer
from accord_face.family.clip_image import load_image_encoder
from accord_face.family.identity_lora import add_identity_lora, save_identity_lora
from accord_face.train.models import IdentityAdapterModel

from test_pipeline_helpers import as_array, astronaut, grace_hopper


def _export(base: str, out, kind: str, lora: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    cad = unet.config.cross_attention_dim
    tokens = 16 if kind == "faceid_portrait" else 4
    enc = build_encoder(kind, id_dim=128, cross_attention_dim=cad, num_tokens=tokens, hidden_dim=256, clip_dim=48)
    model = IdentityAdapterModel(unet, enc, num_tokens=tokens)
    if lora:
        with torch.no_grad():
            for p in add_identity_lora(unet, rank=4):
                p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        for proc in adapter.ip_attention_processors(unet).values():
            for p in proc.parameters():
                p.mul_(3.0)
    info = {"base_model": base, "base_model_path": base, "is_sdxl": False, "cross_attention_dim": cad,
            "num_tokens": tokens, "id_embed_dim": 128, "encoder": kind, "resolution": 64,
            "recognizer": {"name": "sface", "backend": "opencv-zoo", "embedding_dim": 128}}
    if kind.startswith("faceid_plus"):
        info.update(image_encoder_path="embedded:clip-vision", shortcut=kind == "faceid_plusv2", s_scale=1.0)
    return adapter.export_adapter(out, model.encoder, unet, info,
                                  extra=(lambda d: save_identity_lora(d, unet, False)) if lora else None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    paths = {"grace": root / "grace.jpg", "astro": root / "astro.jpg"}
    grace_hopper().save(paths["grace"], quality=95)
    astronaut().save(paths["astro"], quality=95)
    return paths


def test_generate_plusv2_with_lora_matches_plain_diffusers(tiny_pipeline_dir, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = _export(tiny_pipeline_dir, tmp_path / "plus", "faceid_plusv2", lora=True)
    out = tmp_path / "gen"
    common = ["generate", "--adapter", str(folder), "--face", str(photos["grace"]), "--prompt", "a photo of a person",
              "--num-images", "2", "--steps", "2", "--seed", "3", "--clip-image-encoder", "embedded:clip-vision"]
    assert main(common + ["--s-scale", "0.6", "--lora-scale", "0.7", "--out", str(out)]) == 0
    info = json.loads((out / "generate.json").read_text())
    assert info["member"] == "faceid_plusv2" and info["s_scale"] == 0.6 and info["identity_lora"] is True
    assert info["lora_scale"] == 0.7

    # Independently: analyzer -> embedding + aligned crop -> CLIP -> clip_embeds on the stock pipeline.
    analyzer = load_face_analyzer("opencv-zoo")
    rgb = np.asarray(Image.open(photos["grace"]).convert("RGB"))
    face = analyzer.analyze(rgb)[0]
    emb = torch.from_numpy(np.asarray(face.embedding, np.float32)).reshape(1, 1, -1)
    emb = emb / emb.norm()
    enc = load_image_encoder("embedded:clip-vision")
    crop = torch.from_numpy(np.ascontiguousarray(align_face(rgb, face.landmarks, enc.image_size))).permute(2, 0, 1)
    clip = enc(crop[None])                                                            # (1, L, H)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors", adapter_name="identity")
    pipe.set_adapters(["identity"], adapter_weights=[0.7])
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=adapter.WEIGHT_NAME, image_encoder_folder=None)
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    layer.clip_embeds = torch.cat([enc.null_embeds()[None].expand(2, -1, -1, -1), clip[None].expand(2, -1, -1, -1)])
    layer.shortcut, layer.shortcut_scale = True, 0.6
    refs = pipe("a photo of a person", ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb), emb])],
                num_inference_steps=2, guidance_scale=5.0, num_images_per_prompt=2, height=64, width=64,
                generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    for ref, name in zip(refs, ["p00_seed3.png", "p00_seed4.png"]):
        assert np.abs(as_array(ref) - as_array(Image.open(out / name))).max() <= 1

    # --s-scale and --lora-scale change the images
    out2 = tmp_path / "gen2"
    assert main(common + ["--s-scale", "0.0", "--lora-scale", "0.0", "--out", str(out2)]) == 0
    assert np.abs(as_array(Image.open(out2 / "p00_seed3.png")) - as_array(Image.open(out / "p00_seed3.png"))).max() > 0


def test_generate_portrait_uses_every_photo(tiny_pipeline_dir, photos, tmp_path):
    folder = _export(tiny_pipeline_dir, tmp_path / "portrait", "faceid_portrait", lora=False)
    outs = {}
    for n, faces in ((1, ["grace"]), (2, ["grace", "astro"])):
        out = tmp_path / f"gen{n}"
        argv = ["generate", "--adapter", str(folder), "--prompt", "a photo of a person", "--steps", "2",
                "--out", str(out)]
        for f in faces:
            argv += ["--face", str(photos[f])]
        assert main(argv) == 0
        assert json.loads((out / "generate.json").read_text())["member"] == "faceid_portrait"
        outs[n] = as_array(Image.open(out / "p00_seed0.png"))
    assert np.abs(outs[1] - outs[2]).max() > 0                 # the second photo's 16 tokens take part


def test_plus_adapter_without_clip_path_is_a_clear_error(tiny_pipeline_dir, photos, tmp_path, capsys):
    folder = _export(tiny_pipeline_dir, tmp_path / "plus", "faceid_plus", lora=False)
    cfg = json.loads((folder / adapter.CONFIG_NAME).read_text())
    cfg["image_encoder_path"] = "/nonexistent/clip-tower"
    (folder / adapter.CONFIG_NAME).write_text(json.dumps(cfg))
    code = main(["generate", "--adapter", str(folder), "--face", str(photos["grace"]), "--prompt", "x",
                 "--steps", "1", "--out", str(tmp_path / "g")])
    assert code == 2 and "image_encoder_path" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["faceid_portrait", "faceid_plusv2"])
def test_evaluate_runs_each_member(tiny_pipeline_dir, photos, tmp_path, kind):
    faces = tmp_path / "faces"
    (faces / "grace").mkdir(parents=True)
    Image.open(photos["grace"]).save(faces / "grace" / "a.jpg")
    Image.open(photos["grace"]).transpose(0).save(faces / "grace" / "b.png")      # mirrored second photo
    (tmp_path / "prompts.txt").write_text("a photo of a person\n")
    folder = _export(tiny_pipeline_dir, tmp_path / "adapter", kind, lora=kind == "faceid_plusv2")
    out = tmp_path / "eval"
    argv = ["evaluate", "--adapter", str(folder), "--faces", str(faces), "--prompts", str(tmp_path / "prompts.txt"),
            "--scales", "1", "--seeds", "0", "--steps", "2", "--clip-model", "none", "--coupling-samples", "2",
            "--coupling-timesteps", "2", "--out", str(out)]
    if kind == "faceid_plusv2":
        argv += ["--s-scale", "0.5", "--lora-scale", "0.5"]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_samples"] == 1
    if kind == "faceid_plusv2":
        assert "FaceID-Plus" in m["coupling"]["dd"]["skipped"]
    else:
        assert m["coupling"]["dd"]["discrepancy"] > 0
