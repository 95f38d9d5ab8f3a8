#!/usr/bin/env python
"""Step cost of each FaceID family member against plain FaceID, all in one run (paired ratios).

    python benchmarks/bench_family_step.py                          # SD1.5-shaped UNet, 128 px, ViT-H/14 tower, CPU
    python benchmarks/bench_family_step.py --size tiny --clip tiny  # seconds: a smoke run of the script
    python benchmarks/bench_family_step.py --device cuda --resolution 512 --batch 8

One UNet (random weights, SD1.5 architecture from ``accord_face.tiny``) with the IP processors and a
rank-128 identity LoRA that is disabled except in the LoRA rows; one encoder per member. Every row
is a full trainer step with both ACCORD losses on (``compute_losses``: joint forward, the three
no-grad DDLoss branches, PDLoss -> backward -> AdamW), and for FaceID-Plus the frozen CLIP tower's
forward on the batch's face crops (the trainer runs it every step). Rows run round-robin, so each
round gives one row / plain-FaceID ratio; the median and min-max over rounds are printed. CPU time
of the main thread with 1 torch thread on CPU (stable on a shared machine), wall time on CUDA.
The CLIP tower has ViT-H/14 shapes (632 M parameters, 224 px; what the released Plus models use)
unless ``--clip tiny``. On CPU the default 128 px UNet makes the tower's share larger than at
512 px: the GPU run is the one to quote for real training.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import machine, paired_ratios, summary  # noqa: E402

ROWS = [  # (name, member, photos per sample, LoRA on)
    ("faceid", "faceid", 1, False),
    ("faceid_plus", "faceid_plus", 1, False),
    ("faceid_plusv2", "faceid_plusv2", 1, False),
    ("faceid_portrait n=1", "faceid_portrait", 1, False),
    ("faceid_portrait n=3", "faceid_portrait", 3, False),
    ("faceid + LoRA 128", "faceid", 1, True),
    ("faceid_plusv2 + LoRA 128", "faceid_plusv2", 1, True),
]


def clip_tower(kind: str):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from accord_face.family.clip_image import ImageEncoder

    if kind == "vit-h":   # laion/CLIP-ViT-H-14-laion2B-s32B-b79K's vision tower shapes
        cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
    else:
        cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=64, patch_size=16, projection_dim=32)
    torch.manual_seed(0)
    return ImageEncoder(CLIPVisionModelWithProjection(cfg).eval())


def build(size: str, clip_kind: str, device, dtype, resolution: int):
    from accord_face.encoder import build_encoder
    from accord_face.family.identity_lora import add_identity_lora
    from accord_face.tiny import build_components
    from accord_face.train.config import TrainConfig
    from accord_face.train.models import FrozenParts, IdentityAdapterModel, link_pd_text_features

    comps = build_components(size, seed=0)
    unet = comps["unet"]
    cad = unet.config.cross_attention_dim
    image_encoder = clip_tower(clip_kind).to(device=device, dtype=dtype)
    encoders = {}
    for kind, tokens in (("faceid", 4), ("faceid_plus", 4), ("faceid_plusv2", 4), ("faceid_portrait", 16)):
        torch.manual_seed(1)
        encoders[kind] = build_encoder(kind, id_dim=512, cross_attention_dim=cad, num_tokens=tokens,
                                       hidden_dim=1024, clip_dim=image_encoder.hidden_size).to(device)
    model = IdentityAdapterModel(unet, encoders["faceid"], num_tokens=4).to(device)
    add_identity_lora(unet, rank=128)
    unet.to(dtype)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    text_encoder = comps["text_encoder"].to(device=device, dtype=dtype)
    clip = comps["text_encoder_projection"].to(device=device, dtype=dtype)
    parts = link_pd_text_features(FrozenParts(
        path="embedded:" + size, is_sdxl=False, vae=comps["vae"], tokenizers=[comps["tokenizer"]],
        text_encoders=[text_encoder], scheduler=comps["scheduler"], clip=clip, clip_tokenizer=comps["tokenizer"]))
    parts.image_encoder = image_encoder
    cfg = TrainConfig(resolution=resolution)
    cfg = dataclasses.replace(cfg, losses=dataclasses.replace(cfg.losses, lambda_dd=0.1, lambda_pd=0.001,
                                                              dd_batch_fraction=1.0, lambda_warmup_steps=0))
    return model, encoders, parts, cfg


def make_batch(parts, batch: int, resolution: int, device, photos: int):
    from accord_face.train.models import encode_text_with_features
    from accord_face.train.step import StepBatch, sample_generator

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, resolution // 8, resolution // 8, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    caps = ["a photo of a man on a beach"] * batch
    text, _, feats = encode_text_with_features(parts, caps + [""], device)
    keys = [f"k{i}" for i in range(batch)]
    ids = torch.nn.functional.normalize(torch.randn(batch, photos, 512, generator=g), dim=-1).to(device)
    return StepBatch(keys=keys, captions=caps, x0=x0, noise=noise, timesteps=t,
                     noisy=parts.scheduler.add_noise(x0, noise, t), text=text[:-1], text_empty=text[-1:],
                     id_embeds=ids if photos > 1 else ids[:, 0], keep_both=torch.ones(batch, dtype=torch.bool,
                                                                                      device=device),
                     generators=[sample_generator(0, 1, k) for k in keys],
                     text_features=None if feats is None else feats[:-1])


def run_row(model, encoders, parts, cfg, row, sb, crops, device, opt) -> float:
    """Seconds of one trainer step for ``row`` (CLIP tower forward included for FaceID-Plus)."""
    from accord_face.train.step import compute_losses

    name, kind, photos, lora = row
    model.encoder = encoders[kind]
    model.unet.enable_adapters() if lora else model.unet.disable_adapters()
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    tic = clock()
    if kind.startswith("faceid_plus"):
        with torch.no_grad():
            sb.clip = parts.image_encoder(crops).float()[:, None]                  # (B, 1, L, H)
            sb.clip_null = parts.image_encoder.null_embeds().float()[None]
    else:
        sb.clip = sb.clip_null = None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = compute_losses(model, sb, parts, cfg, step=1)
    out["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - tic


def measure(size: str = "sd15", clip_kind: str = "vit-h", device: str = "cpu", batch: int = 4, resolution: int = 0,
            rounds: int = 2, progress=None) -> dict:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    res = resolution or (64 if size == "tiny" else (512 if dev.type == "cuda" else 128))
    model, encoders, parts, cfg = build(size, clip_kind, dev, dtype, res)
    batches = {n: make_batch(parts, batch, res, dev, n) for n in {r[2] for r in ROWS}}
    s = parts.image_encoder.image_size
    crops = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.unet.parameters() if p.requires_grad] + \
        [p for e in encoders.values() for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-6)
    for row in ROWS:                                                       # warm-up
        run_row(model, encoders, parts, cfg, row, batches[row[2]], crops.to(dev), dev, opt)
    sec = {row[0]: [] for row in ROWS}
    for _ in range(rounds):
        for row in ROWS:
            sec[row[0]].append(run_row(model, encoders, parts, cfg, row, batches[row[2]], crops.to(dev), dev, opt))
            if progress:
                progress.update(1)
    base = sec[ROWS[0][0]]
    return {"size": size, "clip": clip_kind, "resolution": res, "batch": batch, "device": device, "rounds": rounds,
            "clock": "wall" if dev.type == "cuda" else "thread_cpu", "machine": machine(),
            "clip_params_m": round(sum(p.numel() for p in parts.image_encoder.parameters()) / 1e6, 1),
            "rows": {name: {"sec_per_step": summary(v), "ratio_vs_faceid": paired_ratios(v, base)}
                     for name, v in sec.items()}}


def format_table(r: dict) -> str:
    unit = "s/step" if r["clock"] == "wall" else "cpu s/step"
    lines = [f"{r['size']} UNet, {r['resolution']} px, batch {r['batch']}, CLIP {r['clip']} ({r['clip_params_m']:.0f} M), "
             f"{r['device']}, DD+PD on, {r['rounds']} rounds, load {r['machine']['load_average']}",
             f"{'member':<26} {unit:>10} {'x faceid (min-max)':>20}"]
    for name, v in r["rows"].items():
        q = v["ratio_vs_faceid"]
        lines.append(f"{name:<26} {v['sec_per_step']['median']:10.2f} {q['median']:8.2f} ({q['min']:.2f}-{q['max']:.2f})")
    return "\n".join(lines)


def main() -> None:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="sd15", choices=["tiny", "small", "sd15"])
    ap.add_argument("--clip", default="vit-h", choices=["vit-h", "tiny"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=0, help="0: 64 for tiny, 128 for sd15 on CPU, 512 on GPU")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tqdm(total=args.rounds * len(ROWS), desc="family step bench", unit="step") as bar:
        result = measure(args.size, args.clip, args.device, args.batch, args.resolution, args.rounds, bar)
    print(format_table(result), flush=True)


if __name__ == "__main__":
    main()
