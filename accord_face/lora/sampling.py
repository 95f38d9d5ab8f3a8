"""Images from the model being trained: validation grids and cached prior-preservation class images."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from PIL import Image

from .models import LoraModels, adapters_disabled


def make_pipeline(models: LoraModels):
    """A ``StableDiffusionPipeline`` over the live components (LoRA active), DDIM sampling."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=DDIMScheduler.from_config(models.scheduler.config), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _autocast(models: LoraModels):
    device = models.device
    if device.type == "cuda" and models.unet.dtype != torch.float32:
        return torch.autocast("cuda", dtype=models.unet.dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(models: LoraModels, prompts: list[str], per_prompt: int, steps: int, guidance: float,
             seed: int, base: bool = False) -> list[Image.Image]:
    """``per_prompt`` images for each prompt (row-major), deterministic in ``seed``."""
    pipe = make_pipeline(models)
    images = []
    was_training = models.unet.training
    models.unet.eval()
    with adapters_disabled(models, base), _autocast(models):
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device="cpu").manual_seed(seed + i)
            out = pipe([prompt] * per_prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen)
            images.extend(out.images)
    models.unet.train(was_training)
    return images


def save_grid(images: list[Image.Image], rows: int, path: str | Path) -> Path:
    """Paste images into a rows x cols grid PNG, written atomically."""
    path = Path(path)
    cols = max(1, len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path


def ensure_class_images(models: LoraModels, folder: str | Path, prompt: str, count: int, steps: int,
                        seed: int, log=print) -> list[Path]:
    """Class images made once by the base model (adapters off) and cached in ``folder``.

    Missing images are generated one by one, each written atomically, so an
    interrupted run resumes where it stopped. A cache made for another prompt
    or base model is an error rather than silently mixed in.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "class_images.json"
    info = {"prompt": prompt, "pretrained": models.pretrained}
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if {k: old.get(k) for k in info} != info:
            raise ValueError(f"{folder} holds class images for {old.get('prompt')!r} from {old.get('pretrained')}; "
                             f"set prior.class_dir to another folder for {prompt!r} from {models.pretrained}")
    else:
        manifest.write_text(json.dumps(info, indent=2))
    paths = [folder / f"class-{i:04d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        log(f"[lora] generating {len(missing)} class images for {prompt!r} into {folder}")
    for i in missing:
        image = generate(models, [prompt], 1, steps, 5.0, seed + 10_000 + i, base=True)[0]
        tmp = folder / f".class-{i:04d}.tmp.png"
        image.save(tmp)
        tmp.replace(paths[i])
    return paths
