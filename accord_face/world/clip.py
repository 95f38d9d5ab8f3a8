"""The world CLIP: a small ViT image tower and a CLIP text tower trained contrastively on renders.

Its text tower is the base pipeline's text encoder (as CLIP-L's is SD1.5's), its
``text_projection`` serves the PDLoss, and its image-text cosine is the world's CLIP-T.

The grammar is small, so a batch holds many captions that are true of several of
its images: the targets are the multi-positive match matrix
``M_ij = 1[caption i is true of image j]`` normalised per row, in both directions
(a plain identity target would push true pairs apart).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tiny import VOCAB_WORDS, make_tokenizer
from .config import ClipConfig
from .pool import Pool, decode_context
from .render import GRAMMAR_WORDS, SIZE, caption

log = logging.getLogger(__name__)

MAX_TOKENS = 24  # the longest grammar caption is 19 tokens with BOS/EOS


def world_tokenizer():
    """CLIPTokenizer with one token per grammar word (and the embedded default's words), 24 positions."""
    words = tuple(dict.fromkeys((*GRAMMAR_WORDS, *VOCAB_WORDS)))
    return make_tokenizer(max_length=MAX_TOKENS, words=words)


def clip_config(cfg: ClipConfig, vocab_size: int):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    h = cfg.hidden
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.layers,
                          num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=h,
                          hidden_act="quick_gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1)
    vision = CLIPVisionConfig(image_size=SIZE, patch_size=8, hidden_size=h, intermediate_size=2 * h,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=4, projection_dim=h,
                              hidden_act="quick_gelu")
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=h)


def build_clip(cfg: ClipConfig, seed: int | None = None):
    from transformers import CLIPModel

    tok = world_tokenizer()
    torch.manual_seed(cfg.seed if seed is None else seed)
    return CLIPModel(clip_config(cfg, len(tok))), tok


def image_processor():
    """Resize to 64 px, scale to [-1, 1] (what the trainers feed the image tower)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor  # no torchvision needed
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)


def _batch_captions(contexts: np.ndarray, rng: np.random.Generator, p_omit: float = 0.25):
    """Captions with random phrases left out, and which phrases each names: (captions, flags (B, 3))."""
    caps, flags = [], []
    for codes in contexts:
        f = rng.random(3) >= np.array([p_omit, p_omit, p_omit / 2])
        caps.append(caption(decode_context(codes), include_shirt=bool(f[0]), include_background=bool(f[1]),
                            include_accessory=bool(f[2])))
        flags.append(f)
    return caps, np.stack(flags)


def match_matrix(contexts: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """M[i, j] = 1 if caption i (context i, naming the phrases in flags i) is true of image j.

    contexts (B, 4): background, shirt, accessory, framing codes; flags (B, 3): shirt, background, accessory named.
    A caption that names no accessory says nothing about one; one that names none of the
    optional phrases still names the framing.
    """
    c = contexts
    same = lambda k: c[:, None, k] == c[None, :, k]  # noqa: E731   (B, B)
    m = same(3).copy()                                 # the framing is always named
    m &= ~flags[:, 0, None] | same(1)                  # shirt
    m &= ~flags[:, 1, None] | same(0)                  # background
    named_acc = flags[:, 2] & (c[:, 2] != 0)           # "and a hat" / "and glasses" in caption i
    m &= ~named_acc[:, None] | same(2)
    return m.astype(np.float32)


def train_clip(cfg: ClipConfig, pool: Pool, progress: bool = True):
    """Contrastive training on pool photos; returns (CLIPModel in eval mode, tokenizer)."""
    model, tok = build_clip(cfg)
    model.train()
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    bar = tqdm(range(cfg.steps), desc="world CLIP", disable=not progress, mininterval=15)
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(pool), cfg.batch_size)
        x, _ = pool.batch(idx)
        caps, flags = _batch_captions(pool.context[idx], rng)
        ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        out = model(input_ids=ids, pixel_values=torch.from_numpy(x))
        logits = out.logits_per_text                                   # (B_text, B_image), scaled
        m = torch.from_numpy(match_matrix(pool.context[idx], flags))   # (B, B): caption i true of image j
        loss = 0.5 * (-(F.log_softmax(logits, 1) * m / m.sum(1, keepdim=True)).sum(1).mean()
                      - (F.log_softmax(logits.t(), 1) * m.t() / m.t().sum(1, keepdim=True).clamp(min=1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % 200 == 0:
            log.info("world CLIP step %d loss %.4f", step + 1, loss.item())
    return model.eval(), tok


@torch.no_grad()
def zero_shot_accuracy(model, tok, pool: Pool, idx: np.ndarray) -> dict[str, float]:
    """Per context field: how often the caption naming the true value beats the captions naming the others."""
    from .pool import CONTEXT_FIELDS
    from .render import Context

    x, _ = pool.batch(idx)
    img = F.normalize(model.get_image_features(pixel_values=torch.from_numpy(x)).pooler_output, dim=-1)
    acc = {}
    for k, (name, options) in enumerate(CONTEXT_FIELDS.items()):
        hits = []
        for row, codes in zip(img, pool.context[idx]):
            base = decode_context(codes).attributes()
            caps = [caption(Context(**{**base, name: o})) for o in options]
            ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
            txt = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
            hits.append(int((txt @ row).argmax()) == int(codes[k]))
        acc[name] = float(np.mean(hits))
    return acc
