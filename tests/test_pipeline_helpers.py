"""Helpers shared by the generate / metrics / evaluate tests (no tests here).

Adapters are written with the trainer's own export (``accord_face.adapter.export_adapter``)
from a real tiny UNet; photos are public-domain portraits shipped inside installed packages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grace_hopper() -> Image.Image:
    import matplotlib

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def no_face_photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee())


def two_faces_photo() -> Image.Image:
    """Grace Hopper (large) beside a small astronaut portrait: two faces, Grace's is the largest."""
    g = grace_hopper()
    canvas = Image.new("RGB", (g.width + 256, g.height), "black")
    canvas.paste(g, (0, 0))
    canvas.paste(astronaut().resize((256, 256)), (g.width, 0))
    return canvas


def export_test_adapter(pipeline_dir: str, out: Path, *, id_dim: int = 128, num_tokens: int = 4, seed: int = 0,
                        unet=None, recognizer: dict | None = None, base_model: str | None = None,
                        is_sdxl: bool = False) -> Path:
    """Export a FaceID adapter for the UNet of ``pipeline_dir`` with the trainer's functions.

    The IP key/value weights are scaled up from their ``to_k``/``to_v`` copies
    and the projection is random, so the identity visibly changes the output.
    """
    from diffusers import UNet2DConditionModel

    from accord_face.adapter import export_adapter, install_ip_attention, ip_attention_processors
    from accord_face.encoder import build_encoder

    unet = unet if unet is not None else UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    cad = unet.config.cross_attention_dim
    install_ip_attention(unet, num_tokens=num_tokens)
    torch.manual_seed(seed)
    encoder = build_encoder("faceid", id_dim=id_dim, cross_attention_dim=cad, num_tokens=num_tokens,
                            hidden_dim=2 * id_dim)
    with torch.no_grad():
        for proc in ip_attention_processors(unet).values():
            for p in proc.parameters():
                p.mul_(3.0)
    from accord_face.fingerprint import base_fingerprint

    rec = recognizer or {"name": "sface", "backend": "opencv-zoo", "embedding_dim": id_dim}
    return export_adapter(out, encoder, unet, {
        "base_fingerprint": base_fingerprint(base_model or str(pipeline_dir), str(pipeline_dir), unet),
        "base_model": base_model or str(pipeline_dir), "base_model_path": base_model or str(pipeline_dir),
        "is_sdxl": is_sdxl, "cross_attention_dim": cad, "num_tokens": num_tokens, "id_embed_dim": id_dim,
        "recognizer": rec, "resolution": 64, "losses": {"dd": 0.0, "pd": 0.0}, "train_steps": 0})


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIPModel (32 px ViT, 2 layers) + the embedded tokenizer + a CLIPImageProcessor, saved."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from accord_face.tiny import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(seed)
    n = len(tok)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=n - 2,
                         eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)
