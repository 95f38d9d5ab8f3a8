"""Evaluation metrics: identity similarity, CLIP-T, and the paper's coupling diagnostics.

- Identity similarity: cosine between the reference identity embedding and the
  embedding of the largest face found in a generated image, with a face
  recognition model (ideally not the one the adapter was conditioned on).
  No face found -> ``None`` (counted as a failure by the evaluation).
- CLIP-T: ``100 * cos(E_img(x), E_txt(prompt))`` in CLIP's joint space
  (DreamBooth / DreamBench convention; no clamping, no 2.5 weight).
- Coupling diagnostics (ACCORD, arXiv 2503.01122): the denoising dependence
  discrepancy ``sum_t (t/T) |Delta_t|`` measured with ``losses.denoising_decouple_delta``
  on held-out samples, and the PDLoss cosine gap ``cos(f_p, f_g) - cos(f_s, f_g)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import losses


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b) = a.b / (|a| |b|) for two vectors (any scale)."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape[0]} vs {b.shape[0]}")
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


# ----------------------------------------------------------------------------- identity


class IdentityScorer:
    """Identity similarity of generated images to a reference, with one face analyzer."""

    def __init__(self, analyzer):
        self.analyzer = analyzer

    @property
    def name(self) -> str:
        return f"{self.analyzer.recognizer_name} ({self.analyzer.backend}, {self.analyzer.embedding_dim}-d)"

    def embed(self, image) -> Optional[np.ndarray]:
        """Embedding of the largest face in a PIL image or (H, W, 3) uint8 array; None when no face is found."""
        faces = self.analyzer.analyze(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
        return None if not faces else np.asarray(faces[0].embedding, np.float32)

    def reference(self, images: Sequence) -> Optional[np.ndarray]:
        """Normalised mean embedding over the images where a face is found (None if none has one)."""
        embeds = [e / np.linalg.norm(e) for e in map(self.embed, images) if e is not None]
        if not embeds:
            return None
        mean = np.mean(embeds, axis=0)
        return mean / np.linalg.norm(mean)

    def score(self, reference: np.ndarray, image) -> Optional[float]:
        """cos(reference, embedding of the generated face), or None when no face is found."""
        emb = self.embed(image)
        return None if emb is None else cosine(reference, emb)


# ----------------------------------------------------------------------------- CLIP-T


class ClipTextScorer:
    """CLIP-T = 100 x cosine(image features, text features) with a CLIPModel folder or hub id."""

    def __init__(self, model, tokenizer, image_processor, name: str = "clip", device: str = "cpu"):
        vocab = getattr(model.config, "text_config", model.config).vocab_size
        if len(tokenizer) != vocab:
            # transformers' offline trap: a hub id may load as a near-empty tokenizer without raising.
            raise ValueError(f"CLIP tokenizer of {name!r} has {len(tokenizer)} tokens but the model expects {vocab}; "
                             "the tokenizer files are missing or wrong (offline?) - pass a complete local folder")
        self.model, self.tokenizer, self.processor = model.eval().to(device), tokenizer, image_processor
        self.name, self.device = name, device

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str = "cpu") -> "ClipTextScorer":
        from transformers import CLIPModel, CLIPTokenizer

        try:
            from transformers import CLIPImageProcessorPil as Processor  # no torchvision needed
        except ImportError:  # older transformers
            from transformers import CLIPImageProcessor as Processor
        try:
            model = CLIPModel.from_pretrained(name_or_path)
            tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
            processor = Processor.from_pretrained(name_or_path)
        except OSError as err:
            raise ValueError(f"cannot load CLIP model {str(name_or_path)!r}: {str(err).splitlines()[0]} "
                             "(pass --clip-model DIR with a local copy, or --clip-model none)") from None
        return cls(model, tokenizer, processor, name=str(name_or_path), device=device)

    @torch.no_grad()
    def features(self, images: Sequence, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (N, D) image and text features."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=pixels).pooler_output          # (N, D)
        txt = self.model.get_text_features(**ids).pooler_output                        # (N, D)
        return torch.nn.functional.normalize(img.float(), dim=-1), torch.nn.functional.normalize(txt.float(), dim=-1)

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        """CLIP-T of each (image, prompt) pair: 100 * cos."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        img, txt = self.features(images, prompts)
        return (100.0 * (img * txt).sum(-1)).tolist()


# ----------------------------------------------------------------------------- coupling diagnostics


def diagnostic_timesteps(num_train_timesteps: int, count: int) -> torch.Tensor:
    """``count`` midpoint timesteps t_k = floor((k + 1/2) T / count): an even grid over [0, T)."""
    k = torch.arange(count, dtype=torch.float64)
    return ((k + 0.5) * num_train_timesteps / count).floor().long()


@dataclass
class CouplingResult:
    """Dependence discrepancy on held-out samples (see ``dependence_discrepancy``)."""

    discrepancy: float                 # mean over samples of the estimated sum_t (t/T)|Delta_t|
    weighted_mean: float               # mean over samples and grid t of (t+1)/T |Delta_t| (what L_DD averages)
    delta_by_quartile: dict[int, float]  # signed mean Delta_t per timestep quartile
    abs_delta_by_t: dict[int, float]   # mean |Delta_t| per grid timestep
    num_samples: int
    timesteps: list[int]


@torch.no_grad()
def dependence_discrepancy(unet, scheduler, latents: torch.Tensor, text_joint: torch.Tensor,
                           text_null: torch.Tensor, id_embeds: torch.Tensor, num_timesteps: int = 10,
                           seed: int = 0, pooled_joint: Optional[torch.Tensor] = None,
                           pooled_null: Optional[torch.Tensor] = None,
                           time_ids: Optional[torch.Tensor] = None) -> CouplingResult:
    """Denoising dependence discrepancy of an IP-Adapter UNet on held-out samples.

        D = sum_{t=1..T} (t/T) |Delta_t|  ~=  (T/K) sum_k (t_k+1)/T |Delta_{t_k}|

    with ``Delta_t`` from ``losses.denoising_decouple_delta`` for the four
    conditions (identity + caption, identity only, caption only, neither; a
    dropped identity is the zero embedding) on a shared noisy latent, over an
    even grid of K timesteps (midpoint rule). Smaller D = less coupling.

    Shapes: latents (B, C, H, W) clean VAE latents; text_joint (B, L, E) caption
    states; text_null (1, L, E) or (B, L, E) empty-prompt states; id_embeds (B, D).
    SDXL also needs pooled_joint (B, P), pooled_null (1, P) and time_ids (B, 6).
    """
    b = latents.shape[0]
    T = scheduler.config.num_train_timesteps
    dtype = next(unet.parameters()).dtype
    device = latents.device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen).to(device)  # one noise per sample, shared by all t
    text_null = text_null.expand(b, -1, -1)
    ids = id_embeds.reshape(b, 1, -1).float()
    text4 = torch.cat([text_joint, text_null, text_joint, text_null]).to(dtype)  # (4B, L, E): pg, p, g, 0
    ids4 = torch.cat([ids, ids, torch.zeros_like(ids), torch.zeros_like(ids)]).to(device, dtype)  # (4B, 1, D)
    added: dict = {"image_embeds": [ids4]}
    if time_ids is not None:  # SDXL: the pooled text follows the caption of each branch
        pooled_null = pooled_null.expand(b, -1)
        added["text_embeds"] = torch.cat([pooled_joint, pooled_null, pooled_joint, pooled_null]).to(device, dtype)
        added["time_ids"] = time_ids.repeat(4, 1).to(device, dtype)  # (4B, 6)
    grid = diagnostic_timesteps(T, num_timesteps)
    weighted, deltas, ts = [], [], []
    from tqdm.auto import tqdm

    for t in tqdm(grid.tolist(), desc="coupling (timesteps)", leave=False):
        tb = torch.full((b,), t, dtype=torch.long)
        x_t = scheduler.add_noise(latents.float().cpu(), noise.float().cpu(), tb).to(device)
        out = unet(x_t.repeat(4, 1, 1, 1).to(dtype), tb.repeat(4).to(device), encoder_hidden_states=text4,
                   added_cond_kwargs=added).sample.float()
        pg, p, g, null = out.chunk(4)  # each (B, C, H, W)
        delta = losses.denoising_decouple_delta(pg, p, g, null, x_t.float(), tb.to(device), scheduler)  # (B,)
        weighted.append(losses.denoising_decouple_weight(scheduler, tb).to(delta.device) * delta.abs())
        deltas.append(delta)
        ts.append(tb)
    weighted_t = torch.stack(weighted, 1).cpu()  # (B, K)
    delta_t = torch.stack(deltas, 1).cpu()       # (B, K)
    return CouplingResult(
        discrepancy=float((weighted_t.sum(1) * T / len(grid)).mean()),
        weighted_mean=float(weighted_t.mean()),
        delta_by_quartile=losses.quartile_means(delta_t.reshape(-1), torch.stack(ts, 1).reshape(-1), T),
        abs_delta_by_t={int(t): float(delta_t[:, k].abs().mean()) for k, t in enumerate(grid.tolist())},
        num_samples=b, timesteps=grid.tolist(),
    )


@torch.no_grad()
def prior_cosine_gap(identity_tokens: torch.Tensor, projection_model, tokenizer, captions: Sequence[str],
                     superclass: str = "a photo of a person", mapping: Optional[Callable] = None) -> dict[str, float]:
    """PDLoss cosine gap in CLIP's joint space, for each identity against every caption.

        gap = cos(f_p, f_g) - cos(f_s, f_g),   f_p = text_projection(mean_k identity_tokens_k)

    ``f_s``, ``f_g`` are ``CLIPTextModelWithProjection.text_embeds`` of the
    superclass prompt and the captions. identity_tokens: (B, K, E) from the
    adapter's image projection, E = the projection model's hidden size.
    ``mapping(projection_model, tokens) -> f_p`` replaces the default (use the
    trainer's ``pd_mapping`` so the diagnostic measures what training optimised).
    Returns the mean |gap| (= L_PD) and the mean signed gap.
    """
    if mapping is None and identity_tokens.shape[-1] != projection_model.config.hidden_size:
        raise ValueError(f"identity tokens have width {identity_tokens.shape[-1]} but the CLIP projection model "
                         f"expects {projection_model.config.hidden_size}")
    ids = tokenizer([superclass, *captions], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    f = projection_model(ids.to(projection_model.device)).text_embeds.float()  # (1 + G, P)
    if mapping is None:
        proj = projection_model.text_projection
        f_p = proj(identity_tokens.to(proj.weight.dtype).mean(1)).float()     # (B, P)
    else:
        f_p = mapping(projection_model, identity_tokens).float()              # (B, P)
    b = f_p.shape[0]
    f_g = f[1:].unsqueeze(0).expand(b, -1, -1)                                   # (B, G, P)
    gap = losses.cosine_gap(f_p, f[0], f_g)                                      # (B, G)
    return {"abs_gap": float(gap.abs().mean()), "signed_gap": float(gap.mean()),
            "num_identities": b, "num_captions": len(captions)}


def mean_or_nan(values: Sequence[Optional[float]]) -> float:
    """Mean of the non-None values (NaN when there are none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan
