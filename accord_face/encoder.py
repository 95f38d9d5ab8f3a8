"""Identity projection models: face embedding -> K identity tokens for decoupled cross-attention.

``FaceIDProjection`` is IP-Adapter-FaceID's MLP:

    Linear(id_dim, hidden) - GELU - Linear(hidden, K * cad) - reshape (K, cad) - LayerNorm(cad)

Its state-dict keys are ``proj.0.*``, ``proj.2.*`` and ``norm.*``: diffusers'
``_convert_ip_adapter_image_proj_to_diffusers`` recognises exactly that layout
(``norm.weight`` present) as FaceID and rebuilds it as
``IPAdapterFaceIDImageProjection(image_embed_dim=id_dim, mult=hidden // id_dim,
num_tokens=K)``. That is why ``hidden`` must be a multiple of ``id_dim``.

``FaceIDPlusProjection`` is FaceID-Plus / Plus-V2 (the reference repository's
``ProjPlusModel`` + ``FacePerceiverResampler``, same state-dict keys):

    x   = LayerNorm(MLP(id))                          (N, 4, cad)   the FaceID tokens (MLP hidden = 2 * id_dim)
    c   = proj_in(clip)                               (N, L, cad)   CLIP penultimate hidden states
    x_l = x_{l-1} + Attn(q = LN(x_{l-1}), kv = [LN(c); LN(x_{l-1})]);  x_l += FF(x_l)    l = 1..4
    out = LayerNorm(proj_out(x_4))                                   (Plus)
    out = x + s_scale * LayerNorm(proj_out(x_4))                      (Plus-V2: the shortcut)

Attention: ``heads = max(1, cad // 64)`` heads of 64 channels, softmax(q k^T / sqrt(64)).
diffusers detects ``perceiver_resampler.proj_in.weight`` as FaceID-Plus and
rebuilds ``IPAdapterFaceIDPlusImageProjection`` (4 tokens, depth 4, 64-channel
heads, FF ratio 4, MLP ratio 2: exactly these); the shortcut and ``s_scale``
are not in the weights but set on the loaded layer (``.shortcut``, ``.shortcut_scale``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FaceIDProjection", "FaceIDPlusProjection", "build_encoder", "ENCODERS", "PLUS_KINDS", "needs_clip"]


class FaceIDProjection(nn.Module):
    """Face embedding (..., id_dim) -> identity tokens (N, K, cad), N = prod(leading dims)."""

    def __init__(self, id_dim: int = 512, cross_attention_dim: int = 768, num_tokens: int = 4, hidden_dim: int = 1024):
        super().__init__()
        if hidden_dim % id_dim:
            # diffusers infers the hidden size as id_dim * (hidden // id_dim); anything else would load wrong.
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a multiple of id_dim ({id_dim}) "
                             "for diffusers to load the exported projection")
        self.id_dim = id_dim
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(
            nn.Linear(id_dim, hidden_dim),
            nn.GELU(),  # exact GELU, as diffusers' FeedForward(activation_fn="gelu")
            nn.Linear(hidden_dim, num_tokens * cross_attention_dim),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(id_embeds)                                     # (..., K*cad)
        x = x.reshape(-1, self.num_tokens, self.cross_attention_dim)  # (N, K, cad)
        return self.norm(x)


class _PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents] (reference ``PerceiverAttention``; keys norm1/norm2/to_q/to_kv/to_out)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)                    # (N, L, d), (N, K, d)
        n, k, _ = latents.shape
        q = self.to_q(latents)                                            # (N, K, h*dh)
        kv_k, kv_v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)   # (N, L+K, h*dh) each

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, -1, self.heads, self.dim_head).transpose(1, 2)     # (N, h, *, dh)

        w = (heads(q) @ heads(kv_k).transpose(-2, -1)) / math.sqrt(self.dim_head)  # (N, h, K, L+K)
        out = torch.softmax(w.float(), dim=-1).to(w.dtype) @ heads(kv_v)           # (N, h, K, dh)
        return self.to_out(out.transpose(1, 2).reshape(n, k, -1))                  # (N, K, d)


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm - Linear - GELU - Linear, no biases (reference resampler ``FeedForward``: keys 0, 1, 3)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class _FacePerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int,
                 ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([nn.ModuleList([_PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
                                     for _ in range(depth)])

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)                                              # (N, L, dim)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))                     # (N, K, out)


class FaceIDPlusProjection(nn.Module):
    """(face embedding (N, id_dim), CLIP hidden states (N, L, clip_dim)) -> identity tokens (N, 4, cad).

    ``shortcut`` (Plus-V2) adds the FaceID tokens back: ``tokens + s_scale * resampler(...)``;
    ``s_scale`` is an attribute (set per call at generation, fixed during training).
    """

    NUM_TOKENS = 4   # diffusers' IPAdapterFaceIDPlusImageProjection default; not inferred from the weights

    def __init__(self, id_dim: int = 512, cross_attention_dim: int = 768, clip_dim: int = 1280,
                 num_tokens: int = 4, shortcut: bool = False, s_scale: float = 1.0, depth: int = 4):
        super().__init__()
        if num_tokens != self.NUM_TOKENS:
            raise ValueError(f"FaceID-Plus uses {self.NUM_TOKENS} identity tokens (diffusers rebuilds the layer with "
                             f"4), got num_tokens={num_tokens}")
        if depth != 4:
            raise ValueError("FaceID-Plus uses 4 resampler layers (diffusers rebuilds the layer with depth 4)")
        self.id_dim, self.cross_attention_dim, self.clip_dim = id_dim, cross_attention_dim, clip_dim
        self.num_tokens, self.shortcut, self.s_scale = num_tokens, shortcut, s_scale
        self.proj = nn.Sequential(nn.Linear(id_dim, id_dim * 2), nn.GELU(),
                                  nn.Linear(id_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = _FacePerceiverResampler(
            dim=cross_attention_dim, depth=depth, dim_head=64, heads=max(1, cross_attention_dim // 64),
            embedding_dim=clip_dim, output_dim=cross_attention_dim, ff_mult=4)

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor) -> torch.Tensor:
        if clip_embeds is None:
            raise ValueError("FaceID-Plus needs the CLIP image hidden states of the face crop (clip_embeds)")
        x = self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)   # (N, 4, cad)
        x = self.norm(x)
        out = self.perceiver_resampler(x, clip_embeds.reshape(-1, *clip_embeds.shape[-2:]))  # (N, 4, cad)
        return x + self.s_scale * out if self.shortcut else out


PLUS_KINDS = ("faceid_plus", "faceid_plusv2")


def needs_clip(kind: str) -> bool:
    """Does this family member read CLIP image hidden states?"""
    return kind in PLUS_KINDS


def build_encoder(kind: str, *, id_dim: int, cross_attention_dim: int, num_tokens: int,
                  hidden_dim: int = 1024, clip_dim: int = 1280, s_scale: float = 1.0) -> nn.Module:
    """Registry lookup (DiT style): ``ENCODERS[kind](...)``.

    faceid / faceid_portrait: ``FaceIDProjection`` (Portrait: 16 tokens per photo, n photos);
    faceid_plus / faceid_plusv2: ``FaceIDPlusProjection`` (v2 with the shortcut, weighted by s_scale).
    """
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r}; choose one of {sorted(ENCODERS)}")
    if kind in PLUS_KINDS:
        return FaceIDPlusProjection(id_dim=id_dim, cross_attention_dim=cross_attention_dim, clip_dim=clip_dim,
                                    num_tokens=num_tokens, shortcut=kind == "faceid_plusv2", s_scale=s_scale)
    return FaceIDProjection(id_dim=id_dim, cross_attention_dim=cross_attention_dim, num_tokens=num_tokens,
                            hidden_dim=hidden_dim)


ENCODERS = {"faceid": FaceIDProjection, "faceid_portrait": FaceIDProjection,
            "faceid_plus": FaceIDPlusProjection, "faceid_plusv2": FaceIDPlusProjection}
