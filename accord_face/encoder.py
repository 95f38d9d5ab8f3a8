"""Identity projection models: face embedding -> K identity tokens for decoupled cross-attention.

``FaceIDProjection`` is IP-Adapter-FaceID's MLP (DESIGN.md section 4):

    Linear(id_dim, hidden) - GELU - Linear(hidden, K * cad) - reshape (K, cad) - LayerNorm(cad)

Its state-dict keys are ``proj.0.*``, ``proj.2.*`` and ``norm.*``: diffusers'
``_convert_ip_adapter_image_proj_to_diffusers`` recognises exactly that layout
(``norm.weight`` present) as FaceID and rebuilds it as
``IPAdapterFaceIDImageProjection(image_embed_dim=id_dim, mult=hidden // id_dim,
num_tokens=K)``. That is why ``hidden`` must be a multiple of ``id_dim``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FaceIDProjection", "build_encoder", "ENCODERS"]


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


def build_encoder(kind: str, *, id_dim: int, cross_attention_dim: int, num_tokens: int,
                  hidden_dim: int = 1024) -> nn.Module:
    """Registry lookup (DiT style): ``ENCODERS[kind](...)``."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[kind](id_dim=id_dim, cross_attention_dim=cross_attention_dim, num_tokens=num_tokens,
                          hidden_dim=hidden_dim)


ENCODERS = {"faceid": FaceIDProjection}
