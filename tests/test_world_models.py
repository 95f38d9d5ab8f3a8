"""The identity world's trained models through the real paths: stock diffusers, onnxruntime, shards, trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def world_dir(_embedded_cache):
    from accord_face.tiny import resolve_pretrained

    return Path(resolve_pretrained("embedded:faces"))


def test_world_pipeline_loads_with_stock_diffusers_offline(world_dir):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTextModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(world_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a photo of a person wearing a red shirt on a blue background", num_inference_steps=2,
               guidance_scale=3.0, height=64, width=64, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    proj = CLIPTextModelWithProjection.from_pretrained(world_dir / "text_encoder_projection")
    ids = pipe.tokenizer(["a photo of a person"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():   # the projection model's tower is the pipeline's text encoder
        torch.testing.assert_close(proj(ids).last_hidden_state, pipe.text_encoder(ids)[0])
    clip = CLIPModel.from_pretrained(world_dir / "world_clip")
    assert clip.config.text_config.hidden_size == pipe.unet.config.cross_attention_dim


def _held_out(n_ids, per_id):
    from accord_face.world.face_models import held_out_photos

    return held_out_photos(n_ids, per_id, seed=5)


@pytest.mark.parametrize("name,dim", [("a", 128), ("b", 96)])
def test_world_recognizers_separate_unseen_people(world_dir, name, dim):
    from accord_face.face import load_face_analyzer

    analyzer = load_face_analyzer("world", world_dir / "face_models", name)
    assert analyzer.embedding_dim == dim and analyzer.recognizer_name == f"world_{name}"
    imgs, ids, _ = _held_out(12, 3)
    faces = [analyzer.analyze(im, max_faces=1) for im in imgs]
    assert all(len(f) == 1 for f in faces)
    emb = np.stack([f[0].embedding for f in faces])
    sim = emb @ emb.T
    same = ids[:, None] == ids[None, :]
    off = ~np.eye(len(ids), dtype=bool)
    assert sim[same & off].mean() - sim[~same].mean() > 0.4
    # batched onnxruntime call == one crop at a time
    crops = [analyzer.align(im, f[0].landmarks) for im, f in zip(imgs[:4], faces[:4])]
    np.testing.assert_allclose(analyzer.embed_aligned_batch(crops), np.stack([analyzer.embed_aligned(c) for c in crops]),
                               atol=1e-5)
    # a background without a person is not a face
    from accord_face.world.render import Context, render_empty

    assert analyzer.detect(render_empty(Context("green", "red"), 3)) == []


def _env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _prepare(photos: Path, shards: Path):
    cmd = [sys.executable, "scripts/prepare_shards.py", "--input", str(photos), "--output", str(shards),
           "--backend", "world", "--resolution", "64", "--context-scale", "8", "--min-image-size", "32",
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_world_shards_read_back_with_the_conditioning_embedding(world_dir, tmp_path):
    from PIL import Image

    from accord_face.data import build_dataset
    from accord_face.face import load_face_analyzer
    from accord_face.world.photos import write_training_photos

    write_training_photos(tmp_path / "photos", range(3), 2, progress=False)
    _prepare(tmp_path / "photos", tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["embedding_dim"] == 128
    assert manifest["recognizer"]["name"] == "world_a" and manifest["recognizer"]["backend"] == "world"
    analyzer = load_face_analyzer("world", world_dir / "face_models", "a")
    samples = list(build_dataset(str(tmp_path / "shards"), resolution=64, shuffle_buffer=0, split_by_node=False,
                                 split_by_worker=False))
    assert len(samples) == 6
    meta = [json.loads(line) for line in (tmp_path / "photos" / "metadata.jsonl").read_text().splitlines()]
    captions = {m["caption"] for m in meta}
    for s in samples:
        assert s["face_embedding"].shape == (128,) and s["caption"] in captions
    # the stored embedding is the recognizer's embedding of the photo
    first = np.asarray(Image.open(tmp_path / "photos" / meta[0]["file_name"]).convert("RGB"))
    ref = analyzer.analyze(first)[0].embedding
    best = max(float(np.dot(ref, s["face_embedding"].numpy())) for s in samples)
    assert best > 0.999


@pytest.mark.heavy
def test_short_training_lowers_heldout_denoising_loss(world_dir, tmp_path):
    """A few minutes of the real trainer (deepspeed launcher, ACCORD on): the adapter denoises photos of
    people it never saw better than the untrained adapter, at identical noise and timesteps."""
    from accord_face.world.heldout import heldout_loss
    from accord_face.world.photos import write_reference_photos, write_training_photos

    write_training_photos(tmp_path / "photos", range(0, 400), 2, progress=False)
    _prepare(tmp_path / "photos", tmp_path / "shards")
    write_reference_photos(tmp_path / "held", 48)
    _prepare(tmp_path / "held", tmp_path / "held_shards")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", "29847",
           "scripts/train_encoder.py", "--config", "configs/faces.yaml", f"shards={tmp_path / 'shards'}",
           f"output_dir={tmp_path / 'run'}", "max_steps=120", "checkpointing.checkpointing_steps=0",
           "validation.num_faces=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    kw = dict(config=str(ROOT / "configs/faces.yaml"), shards=str(tmp_path / "held_shards"), batches=3)
    untrained = heldout_loss(adapter=None, **kw)
    trained = heldout_loss(adapter=str(tmp_path / "run" / "adapter"), **kw)
    assert trained < untrained, (trained, untrained)


def test_render_ceiling_finds_the_people_in_clean_renders_and_not_in_swapped_ones(world_dir, tmp_path):
    """The evaluation's ceiling (a perfect generator = clean renders in context B) retrieves the right person;
    with every job's person swapped for another held-out one it falls to chance: a check that can fail."""
    import dataclasses

    from accord_face.world.evaluate import EvalPlan, WorldScorer, render_ceiling

    scorer = WorldScorer()
    plan = EvalPlan.make(tmp_path / "refs", 8, 1, 0, scorer)
    ceiling = render_ceiling(plan, scorer)
    assert ceiling["retrieval_top1"]["n"] == 8 and ceiling["retrieval_top1"]["mean"] >= 0.6
    assert ceiling["identity_similarity"]["mean"] > 0.5
    names = plan.names
    swapped = {n: {**plan.refs[n], "identity": plan.refs[names[(k + 1) % len(names)]]["identity"]}
               for k, n in enumerate(names)}
    wrong = render_ceiling(dataclasses.replace(plan, refs=swapped), scorer)
    assert wrong["retrieval_top1"]["mean"] <= 0.25 and wrong["identity_similarity"]["mean"] < 0.3


def test_conditioning_photos_are_other_photos_of_the_same_person(world_dir, tmp_path):
    """``conditioning_photos=3``: the reference first, then 2 new photos of that person (not copies of the
    reference); the independent recognizer finds each extra photo's own person among the references more
    often than chance; 0 photos is refused."""
    from PIL import Image

    from accord_face.world.evaluate import EvalPlan, WorldScorer

    scorer = WorldScorer()
    plan = EvalPlan.make(tmp_path / "refs", 8, 1, 0, scorer, conditioning_photos=3)
    names = [n for n in plan.names if plan.ref_b[n] is not None]
    gallery = np.stack([plan.ref_b[n] for n in names])
    hits = total = 0
    for n in names:
        files = plan.conditioning(n)
        assert len(files) == 3 and files[0] == plan.photo(n) and all(f.is_file() for f in files)
        ref = np.asarray(Image.open(files[0]))
        for f in files[1:]:
            img = np.asarray(Image.open(f).convert("RGB"))
            assert np.abs(img.astype(float) - ref).mean() > 5, f"{f} is the reference again"
            e = scorer.embed(img)
            if e is not None:
                hits += names[int(np.argmax(gallery @ e))] == n
                total += 1
    assert total >= 10 and hits / total >= 0.5, (hits, total)
    assert EvalPlan.make(tmp_path / "refs1", 2, 1, 0, scorer).conditioning("h2000") \
        == [tmp_path / "refs1" / "h2000.png"]
    with pytest.raises(ValueError, match="conditioning_photos=0"):
        EvalPlan.make(tmp_path / "refs0", 2, 1, 0, scorer, conditioning_photos=0)


def test_recognizer_agreement_finds_the_people_in_their_own_photos_and_not_in_swapped_ones(world_dir, tmp_path):
    """An evaluation folder whose 'adapter' images are new photos of each reference's person and whose 'base'
    images are photos of the next person: both recognizers retrieve the first and miss the second."""
    from PIL import Image

    from accord_face.world.diagnosis import recognizer_agreement
    from accord_face.world.render import random_context, render

    rng = np.random.default_rng(0)
    people = list(range(2000, 2008))
    (tmp_path / "references").mkdir()
    lines = []
    for k, i in enumerate(people):
        Image.fromarray(render(i, random_context(rng), 1).image).save(tmp_path / "references" / f"h{i:04d}.png")
        for arm, who in (("adapter", i), ("base", people[(k + 1) % len(people)])):
            rel = f"images/{arm}/h{i:04d}_p0.png"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(who, random_context(rng), 2).image).save(tmp_path / rel)
            lines.append(json.dumps({"arm": arm, "identity": f"h{i:04d}", "image": rel}))
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    res = recognizer_agreement(tmp_path, clean_per_identity=1)
    assert res["identities"] == 8
    for k in ("a", "b"):
        assert res["adapter"][k]["retrieval_top1"]["mean"] >= 0.6, (k, res["adapter"][k])
        assert res["base"][k]["retrieval_top1"]["mean"] <= 0.25, (k, res["base"][k])
        assert res["clean_renders"][k]["retrieval_top1"]["mean"] >= 0.6
        assert res["adapter"][k]["identity_similarity"]["mean"] > res["base"][k]["identity_similarity"]["mean"] + 0.2


def test_vae_ceiling_keeps_people_through_the_world_vae_and_loses_them_through_a_broken_one(world_dir, tmp_path):
    """The ceiling through the VAE (renders -> decode(mode(encode(x)))) keeps identity with the world's VAE;
    the same VAE with its decoder's output convolution zeroed returns a flat image and finds nobody."""
    import copy

    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from accord_face.world.evaluate import EvalPlan, WorldScorer, render_ceiling, vae_round_trip
    from accord_face.world.render import random_context, render

    vae = AutoencoderKL.from_pretrained(world_dir / "vae")
    x = np.stack([render(i, random_context(np.random.default_rng(i)), 0).image for i in (2000, 2001, 2002)])
    y = np.stack(vae_round_trip(vae, x))
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.abs(y.astype(float) - x).mean() < 12, "world VAE reconstruction error (README: 6.9 / 255)"
    scorer = WorldScorer()
    plan = EvalPlan.make(tmp_path / "refs", 8, 1, 0, scorer)
    kept = render_ceiling(plan, scorer, vae=vae)["through_vae"]
    assert kept["retrieval_top1"]["mean"] >= 0.6 and kept["identity_similarity"]["mean"] > 0.5
    broken = copy.deepcopy(vae)
    with torch.no_grad():
        broken.decoder.conv_out.weight.zero_()
    lost = render_ceiling(plan, scorer, vae=broken)["through_vae"]
    assert lost["retrieval_top1"]["mean"] <= 0.25


@pytest.mark.heavy  # two deepspeed launches and two small evaluations: ~2-4 min on the shared 2 cores
def test_length_curve_continues_one_run_and_never_redoes_a_milestone(world_dir, tmp_path, monkeypatch):
    from accord_face.world import length as L

    monkeypatch.setattr(L, "REPO", ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    cfg = L.LengthConfig(out=str(tmp_path / "out"), archive=str(tmp_path / "docs"), milestones=[3, 6],
                         train_identities=12, photos_per_identity=2, identities=4, eval_steps=2, port=29893,
                         overrides=["train_batch_size=4", "checkpointing.checkpointing_steps=3",
                                    "validation.num_faces=0", "data.shuffle_buffer=0"])
    res = L.run_length(cfg)
    assert set(res["milestones"]) == {"3", "6"} and not res["pending"]
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]                       # one run, continued
    assert "resumed from" in (out / "train.log").read_text()
    a3 = json.loads((out / "adapter-3" / "adapter_config.json").read_text())["train_steps"]
    a6 = json.loads((out / "adapter-6" / "adapter_config.json").read_text())["train_steps"]
    assert (a3, a6) == (3, 6)
    for s in ("3", "6"):
        m = res["milestones"][s]
        assert 0 <= m["retrieval_top1"]["mean"] <= 1 and m["identity_similarity"]["ci95"] is not None
    assert res["render_ceiling"]["retrieval_top1"]["mean"] > res["chance_top1"]
    assert (tmp_path / "docs" / "curve.png").is_file() and (tmp_path / "docs" / "steps-6.json").is_file()
    # a fresh working folder with the same archive: the curve comes back, nothing trains
    again = L.run_length(L.LengthConfig(**{**cfg.__dict__, "out": str(tmp_path / "fresh")}))
    assert again["milestones"] == res["milestones"] and not (tmp_path / "fresh" / "train").exists()
    # a new milestone in a fresh folder continues from the archived checkpoint of step 6, not from step 0
    assert [p.name for p in (tmp_path / "docs" / "resume" / "train" / "checkpoints").iterdir()] == ["step-00000006"]
    more = L.run_length(L.LengthConfig(**{**cfg.__dict__, "out": str(tmp_path / "fresh"), "milestones": [3, 6, 9]}))
    rows = [json.loads(x) for x in (tmp_path / "fresh" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 8, 9] and set(more["milestones"]) == {"3", "6", "9"}
    assert [p.name for p in (tmp_path / "docs" / "resume" / "train" / "checkpoints").iterdir()] == ["step-00000009"]
    with pytest.raises(ValueError, match="increasing"):
        L.LengthConfig(milestones=[6, 3]).validate()
