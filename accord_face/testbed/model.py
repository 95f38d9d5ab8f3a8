"""The base text-to-image model of the testbed: a tiny word-level text encoder
and a small pixel-space diffusers ``UNet2DConditionModel``, plus CFG sampling.

Pixel space (32 x 32 x 3, no VAE) keeps everything CPU-sized; the DDLoss norms
are then summed over 3,072 pixel values per sample instead of SD's latent.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
import torch.nn.functional as F
from torch import nn

from accord_face.testbed.world import SIZE, VOCAB

PAD, BOS = 0, 1
WORDS = ("<pad>", "<bos>") + VOCAB
MAX_LEN = 16
TEXT_DIM = 64


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Word-level ids (N, MAX_LEN): BOS, words, PAD...; unknown words raise with the prompt named."""
    out = torch.full((len(prompts), MAX_LEN), PAD, dtype=torch.long)
    for i, p in enumerate(prompts):
        words = p.split()
        if len(words) + 1 > MAX_LEN:
            raise ValueError(f"prompt {p!r} has {len(words)} words; the testbed encoder takes at most {MAX_LEN - 1}")
        try:
            ids = [BOS] + [WORDS.index(w) for w in words]
        except ValueError as err:
            raise ValueError(f"prompt {p!r} uses a word outside the grammar's vocabulary {VOCAB}") from err
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class TextEncoder(nn.Module):
    """Embedding + 2 bidirectional transformer layers: ids (N, L) -> hidden states (N, L, TEXT_DIM)."""

    def __init__(self, dim: int = TEXT_DIM, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(len(WORDS), dim)
        self.pos = nn.Parameter(torch.zeros(MAX_LEN, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[: ids.shape[1]]                 # (N, L, D)
        h = self.body(h, src_key_padding_mask=ids == PAD)            # pads neither attend nor are attended
        return self.norm(h)


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    """~1M-parameter UNet on the pixel-unshuffled image (12 x 16 x 16: each 2x2 pixel patch is one
    position, a lossless stand-in for a VAE). GroupNorm with 8 groups: 32 groups on 32 channels
    would be an instance norm, unable to carry the background's mean colour."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=12, out_channels=12, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )


def build_scheduler() -> DDPMScheduler:
    """Cosine schedule, v-prediction: an epsilon-prediction model this small left visible noise in
    its samples (it cannot predict the noise at small t), which the judges then misread."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False)


def training_target(sched: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses: v = sqrt(abar) eps - sqrt(1 - abar) x0 (or eps / x0 per the scheduler)."""
    kind = sched.config.prediction_type
    if kind == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    return noise if kind == "epsilon" else x0


class T2I(nn.Module):
    """UNet + text encoder as one module, so a frozen copy is one ``deepcopy``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.text = TextEncoder()
        self.unet = build_unet(seed)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.text(tokenize(prompts))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t (N, 3, H, W), t (N,), cond (N, L, D) -> raw output (N, 3, H, W) (v, per the scheduler)."""
        h = F.pixel_unshuffle(x_t, 2)                                    # (N, 12, H/2, W/2)
        return F.pixel_shuffle(self.unet(h, t, encoder_hidden_states=cond).sample, 2)


@torch.no_grad()
def sample(model: T2I, prompts: list[str], seed: int, steps: int = 25, guidance: float = 4.0, eta: float = 1.0,
           train_scheduler: DDPMScheduler | None = None) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance; returns (N, 3, H, W) in [-1, 1]."""
    # clip the x0 estimate to the image range: with the cosine schedule abar_T ~ 0, and an unclipped
    # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) blows up the first steps.
    sched = DDIMScheduler.from_config((train_scheduler or build_scheduler()).config, clip_sample=True)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 3, SIZE, SIZE, generator=gen)
    cond = torch.cat([model.encode(prompts), model.encode([""] * len(prompts))])  # (2N, L, D)
    for t in sched.timesteps:
        eps = model(torch.cat([x, x]), t.repeat(2 * len(prompts)), cond)
        e_c, e_u = eps.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x, eta=eta, generator=gen).prev_sample
    return x.clamp(-1, 1)


def to_uint8(images: torch.Tensor):
    """(N, 3, H, W) in [-1, 1] -> numpy uint8 (N, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
