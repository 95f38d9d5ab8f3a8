"""Model parts for the encoder trainer: loading, the trainable wrapper, frozen encoders, dtype policy.

One wrapper module (``IdentityAdapterModel``) holds the frozen UNet and the
trainable parts (identity encoder + the ``to_k_ip``/``to_v_ip`` weights that
``adapter.install_ip_attention`` put on the UNet); it is what DeepSpeed wraps.
The VAE, text encoder(s) and the CLIP projection model stay outside, frozen,
and only run under ``torch.no_grad()``.

Dtype policy (the one place it lives): trainable weights are created in fp32
(DeepSpeed keeps fp32 masters under bf16/fp16); frozen models outside the
engine run in the compute dtype (half precision on GPU, fp32 on CPU); losses
are computed in fp32 (step.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .. import adapter
from ..encoder import build_encoder
from ..tiny import projection_model_path, resolve_pretrained
from ..config import ConfigError
from .config import TrainConfig

__all__ = ["IdentityAdapterModel", "FrozenParts", "load_frozen_parts", "build_model", "compute_dtype",
           "encode_text", "encode_text_with_features", "link_pd_text_features", "superclass_features",
           "PD_MAPPINGS", "resolve_clip_model", "reference_fn"]


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp16 on GPU; fp32 on CPU; ``no`` (= ``fp32``): fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class IdentityAdapterModel(nn.Module):
    """Frozen UNet with decoupled cross-attention + trainable identity encoder.

    forward(noisy (B,C,h,w), t (B,), text (B,L,cad), id_embeds (B,D) or (B,n,D), added_cond_kwargs,
    clip_embeds (B,n,L,H) or None) -> (pred (B,C,h,w), tokens (B,n*K,cad)).
    n photos per sample (Portrait) give n*K tokens, photo-major, as diffusers flattens
    ``ip_adapter_image_embeds`` (B, n, D). FaceID-Plus members also take the CLIP hidden
    states of the face crops. The identity tokens reach the IP processors exactly as
    diffusers' pipeline passes them: ``encoder_hidden_states=(text, [tokens])``.
    """

    def __init__(self, unet: nn.Module, encoder: nn.Module, num_tokens: int, ip_scale: float = 1.0):
        super().__init__()
        unet.requires_grad_(False)
        adapter.install_ip_attention(unet, num_tokens=num_tokens, scale=ip_scale)
        for p in adapter.ip_attention_parameters(unet):
            p.requires_grad_(True)
        encoder.requires_grad_(True)
        self.unet = unet
        self.encoder = encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, id_embeds: torch.Tensor,
                added_cond_kwargs: Optional[dict] = None, clip_embeds: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = next(self.encoder.parameters()).dtype
        b = id_embeds.shape[0]
        ids = id_embeds.reshape(-1, id_embeds.shape[-1]).to(dtype)      # (B*n, D)
        if clip_embeds is None:
            tokens = self.encoder(ids)                                  # (B*n, K, cad)
        else:
            tokens = self.encoder(ids, clip_embeds.reshape(-1, *clip_embeds.shape[-2:]).to(dtype))
        tokens = tokens.reshape(b, -1, tokens.shape[-1])                # (B, n*K, cad)
        if added_cond_kwargs is not None:                               # SDXL pooled embeds / time ids
            added_cond_kwargs = {k: v.to(dtype) for k, v in added_cond_kwargs.items()}
        pred = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=(text.to(dtype), [tokens]),
                         added_cond_kwargs=added_cond_kwargs).sample    # (B, C, h, w)
        return pred, tokens

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}


def reference_fn(model: nn.Module, initial: Optional[dict[str, torch.Tensor]]) -> Callable:
    """The DDLoss reference branches: the live model, or the same modules with the initial trainable weights.

    ``torch.func.functional_call`` swaps the trainable tensors for the call only,
    so the frozen UNet is shared, not copied (ZeRO-1/2; preflight refuses ZeRO-3).
    """
    if initial is None:
        return model
    return lambda *args, **kw: torch.func.functional_call(model, initial, args, kw, strict=False)


@dataclass
class FrozenParts:
    """Everything outside the engine."""

    path: str                 # resolved local folder or hub id
    is_sdxl: bool
    vae: nn.Module
    tokenizers: list
    text_encoders: list
    scheduler: Any
    clip: Optional[nn.Module] = None      # CLIPTextModelWithProjection for PDLoss
    clip_tokenizer: Any = None
    # True when the conditioning text forward already yields PDLoss's caption features f_g
    # (SD1.5: ``clip`` shares the text tower; SDXL: ``clip`` is text_encoder_2): no second CLIP pass.
    pd_from_conditioning: bool = False
    feature_cache: dict = field(default_factory=dict)   # {(prompt, device): f (P,)}: superclass features
    image_encoder: Optional[nn.Module] = None   # FaceID-Plus: family.clip_image.ImageEncoder (frozen CLIP vision)
    identity_bank: Any = None                   # Portrait: family.portrait.IdentityBank (photos per person)
    reference_bank: Any = None                  # encoder.reference=other_photo: family.reference.ReferenceBank
    identity_loss: Any = None                   # losses.lambda_id > 0: train.identity_loss.IdentityLoss
    latent_cache: Any = None                    # data.latent_cache_mb > 0: train.latent_cache.LatentCache


def _check_tokenizer(tok, where: str):
    # Offline, CLIPTokenizer.from_pretrained(<hub id>) can return a 2-token vocab instead of raising.
    if len(tok) < 100:
        raise RuntimeError(f"tokenizer from {where} has only {len(tok)} tokens: the files are missing "
                           "(offline cache?); download the model once or point pretrained_model at a local folder")
    return tok


def resolve_clip_model(cfg: TrainConfig, path: str, is_sdxl: bool) -> tuple[str, Optional[str]]:
    """(model path, subfolder) of the CLIPTextModelWithProjection used by PDLoss."""
    if cfg.clip_model != "auto":
        return cfg.clip_model, None
    if is_sdxl:
        return path, "text_encoder_2"
    local = projection_model_path(path) if Path(path).is_dir() else None
    return (local, None) if local else ("openai/clip-vit-large-patch14", None)


def load_frozen_parts(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, with_clip: bool) -> FrozenParts:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_pretrained(cfg.pretrained_model)
    is_sdxl = (Path(path) / "text_encoder_2").is_dir() if Path(path).is_dir() else "xl" in path.lower()
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    tokenizers = [_check_tokenizer(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"), path)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
    if is_sdxl:
        tokenizers.append(_check_tokenizer(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"), path))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    clip = clip_tok = None
    if with_clip:
        clip_path, sub = resolve_clip_model(cfg, path, is_sdxl)
        if is_sdxl and sub == "text_encoder_2":
            clip, clip_tok = text_encoders[1], tokenizers[1]
        else:
            clip = CLIPTextModelWithProjection.from_pretrained(clip_path)
            clip_tok = _check_tokenizer(CLIPTokenizer.from_pretrained(clip_path), clip_path)
    for m in [vae, *text_encoders] + ([clip] if clip is not None else []):
        m.requires_grad_(False).eval().to(device=device, dtype=dtype)
    if dtype == torch.float16:
        vae.to(torch.float32)  # SD's VAE overflows in fp16
    return link_pd_text_features(FrozenParts(path=path, is_sdxl=is_sdxl, vae=vae, tokenizers=tokenizers,
                                             text_encoders=text_encoders, scheduler=scheduler, clip=clip,
                                             clip_tokenizer=clip_tok))


def _same_tokenizer(a, b) -> bool:
    probe = ["a photo of a person", "A Woman, wearing 2 red hats!"]
    return (a is b) or (a.model_max_length == b.model_max_length and a.pad_token_id == b.pad_token_id
                        and a.get_vocab() == b.get_vocab() and a(probe).input_ids == b(probe).input_ids)


_TOWER_CONFIG = ("hidden_act", "layer_norm_eps", "eos_token_id", "num_attention_heads", "max_position_embeddings")


def _same_text_tower(a: nn.Module, b: nn.Module) -> bool:
    """Same architecture settings (pooling: eos_token_id) and bit-identical weights."""
    if any(getattr(a.config, k, None) != getattr(b.config, k, None) for k in _TOWER_CONFIG):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k]))
                                          for k in sa)


def link_pd_text_features(parts: FrozenParts) -> FrozenParts:
    """Let PDLoss read f_g from the conditioning forward instead of a second CLIP pass (in place).

    SDXL with ``clip`` = text_encoder_2: f_g is that forward's ``text_embeds`` already. SD1.5: when the
    PDLoss CLIP's text tower equals the conditioning text encoder (same weights and tokenizer, as for
    SD1.5 + openai/clip-vit-large-patch14 and the embedded pipelines), f_g = text_projection(pooled
    output) of the conditioning forward, and ``clip`` reuses the encoder's tower (one copy in memory).
    """
    if parts.clip is None:
        return parts
    if parts.is_sdxl:
        parts.pd_from_conditioning = parts.clip is parts.text_encoders[-1]
        return parts
    enc = parts.text_encoders[0]                            # CLIPTextModel; clip.text_model is one too
    if _same_tokenizer(parts.clip_tokenizer, parts.tokenizers[0]) and _same_text_tower(parts.clip.text_model, enc):
        parts.clip.text_model = enc
        parts.pd_from_conditioning = True
    return parts


def build_model(cfg: TrainConfig, parts: FrozenParts) -> IdentityAdapterModel:
    """UNet (frozen, fp32 until DeepSpeed casts it) + identity encoder, deterministic in cfg.seed."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(parts.path, subfolder="unet")
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(cfg.encoder.kind, id_dim=cfg.encoder.id_embed_dim,
                            cross_attention_dim=unet.config.cross_attention_dim,
                            num_tokens=cfg.encoder.num_tokens, hidden_dim=cfg.encoder.hidden_dim,
                            clip_dim=parts.image_encoder.hidden_size if parts.image_encoder is not None else 1280,
                            s_scale=cfg.encoder.s_scale)
    model = IdentityAdapterModel(unet, encoder, cfg.encoder.num_tokens, cfg.encoder.ip_scale)
    if cfg.init_adapter:                       # warm start: an earlier run's exported weights (checked in preflight)
        try:
            adapter.load_into_training(adapter.load_adapter_state_dict(cfg.init_adapter), model.encoder, model.unet)
        except (KeyError, RuntimeError) as err:
            raise ConfigError(f"'init_adapter': {cfg.init_adapter} does not fit this model ({err})") from None
    if cfg.lora.rank > 0:                      # after the IP processors: their to_k_ip / to_v_ip stay LoRA-free
        from ..family.identity_lora import add_identity_lora

        torch.manual_seed(cfg.seed + 1)
        add_identity_lora(model.unet, cfg.lora.rank, cfg.lora.alpha or None, cfg.lora.targets)
    return model


@torch.no_grad()
def encode_text(parts: FrozenParts, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Prompts -> (hidden states (B, L, cad), pooled (B, P) for SDXL else None), as the SD/SDXL pipelines do."""
    hidden, pooled, _ = encode_text_with_features(parts, prompts, device)
    return hidden, pooled


@torch.no_grad()
def encode_text_with_features(parts: FrozenParts, prompts: list[str], device: torch.device
                              ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """As ``encode_text``, plus PDLoss's CLIP joint-space features (B, P) of the prompts from the same
    forward when ``parts.pd_from_conditioning`` (else None): equal to ``clip_text_features(parts, prompts)``."""
    hidden, pooled, features = [], None, None
    for tok, enc in zip(parts.tokenizers, parts.text_encoders):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        if not parts.is_sdxl:
            out = enc(ids)
            hidden.append(out.last_hidden_state)
            if parts.pd_from_conditioning:                   # CLIPTextModelWithProjection's own text_embeds
                features = parts.clip.text_projection(out.pooler_output).float()
            continue
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])                 # SDXL uses the penultimate layer
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds                         # (B, 1280) from text_encoder_2
    if parts.is_sdxl and parts.pd_from_conditioning:
        features = pooled.float()
    return torch.cat(hidden, dim=-1), pooled, features


def sdxl_time_ids(batch: int, resolution: int, device: torch.device) -> torch.Tensor:
    """(orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample: square, uncropped."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device,
                        dtype=torch.float32).repeat(batch, 1)


@torch.no_grad()
def clip_text_features(parts: FrozenParts, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP joint-space text features ``text_embeds`` (B, P) for f_s / f_g."""
    tok = parts.clip_tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    return parts.clip(ids).text_embeds.float()


def superclass_features(parts: FrozenParts, prompt: str, device: torch.device) -> torch.Tensor:
    """f_s (P,) of the superclass prompt, computed once per (prompt, device) and cached on ``parts``."""
    key = (prompt, str(device))
    if key not in parts.feature_cache:
        parts.feature_cache[key] = clip_text_features(parts, [prompt], device)[0]
    return parts.feature_cache[key]


def _text_projection_mean(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """f_p = W_proj mean_k(tokens): the identity tokens live in the text encoder's hidden space."""
    w = clip.text_projection.weight                                     # (P, H)
    return tokens.float().mean(dim=1) @ w.float().t()                   # (B, K, H) -> (B, P)


def _text_projection_mean_tail(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """As above on the last H dims (SDXL: cad = 768 CLIP-L ++ 1280 bigG; text_encoder_2 is bigG)."""
    w = clip.text_projection.weight
    return tokens.float().mean(dim=1)[:, -w.shape[1]:] @ w.float().t()


PD_MAPPINGS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "text_projection_mean": _text_projection_mean,
    "text_projection_mean_tail": _text_projection_mean_tail,
}
