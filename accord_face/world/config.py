"""Typed config of the identity world's models (``configs/world.yaml`` overrides it).

The recorded config of the committed assets is compared with this one: assets are
reused only while every field that shapes a model matches (``model_fields``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from accord_face.config import field


@dataclass
class PoolConfig:
    photos_per_identity: int = field(12, help="photos rendered per training identity (random contexts)")
    seed: int = field(0, help="pool seed")


@dataclass
class ClipConfig:
    hidden: int = field(96, help="width of both towers; the text width is the UNet's cross-attention width")
    layers: int = field(3, help="transformer layers of the text tower")
    vision_layers: int = field(2, help="transformer layers of the image tower (8 px patches)")
    steps: int = field(1200, help="contrastive training steps")
    batch_size: int = field(64, help="image-caption pairs per step")
    lr: float = field(1e-3, help="AdamW learning rate (warm-up 100 steps, cosine decay)")
    seed: int = field(1, help="init / data seed")


@dataclass
class VaeConfig:
    channels: list[int] = field(default_factory=lambda: [32, 48, 64], help="AutoencoderKL block widths (4x down)")
    steps: int = field(1500, help="training steps on 32 px crops (the VAE is fully convolutional)")
    batch_size: int = field(32, help="crops per step")
    lr: float = field(1e-3, help="AdamW learning rate")
    kl_weight: float = field(1e-6, help="KL weight (SD's)")
    seed: int = field(2, help="init / data seed")


@dataclass
class UnetConfig:
    channels: list[int] = field(default_factory=lambda: [48, 96, 128], help="UNet block widths on the 16x16 latent")
    heads: int = field(4, help="attention heads per transformer block")
    steps: int = field(1800, help="denoising training steps from scratch")
    batch_size: int = field(32, help="latents per step")
    lr: float = field(6e-4, help="AdamW learning rate (warm-up 200 steps)")
    ema_decay: float = field(0.999, help="EMA decay; the EMA weights are the ones saved")
    caption_dropout: float = field(0.1, help="empty-caption probability (classifier-free guidance)")
    checkpoint_every: int = field(200, help="steps between resumable checkpoints")
    seed: int = field(3, help="init / data seed")
    continue_from: str = field("", help="'assets': continue the committed UNet (its EMA weights, at its recorded step "
                                        "count) with a fresh optimizer and warm-up, up to `steps`, instead of "
                                        "training from random weights; or a folder of world assets written by "
                                        "the assets stage (world.json, unet.safetensors): continue that UNet")

    def validate(self) -> None:
        c = self.continue_from
        if c not in ("", "assets") and not (Path(c) / "world.json").is_file():
            raise ValueError(f"unet.continue_from must be '' or 'assets' or a world assets folder holding "
                             f"world.json, got {c!r}")


@dataclass
class RecognizerConfig:
    steps: int = field(1500, help="training steps (CosFace margin over the training identities)")
    batch_size: int = field(96, help="aligned crops per step")
    lr: float = field(2e-3, help="AdamW learning rate")
    margin: float = field(0.3, help="CosFace additive margin m in cos(theta) - m")
    scale: float = field(24.0, help="CosFace logit scale s")
    seed: int = field(4, help="init / data seed")


@dataclass
class DetectorConfig:
    steps: int = field(1500, help="landmark-regression / face-score training steps")
    batch_size: int = field(64, help="images per step (a quarter are faceless negatives)")
    lr: float = field(2e-3, help="AdamW learning rate")
    seed: int = field(5, help="init / data seed")


@dataclass
class JudgeConfig:
    steps: int = field(1000, help="attribute-classifier training steps on augmented renders")
    batch_size: int = field(64, help="images per step")
    lr: float = field(2e-3, help="AdamW learning rate")
    seed: int = field(6, help="init / data seed")


@dataclass
class WorldConfig:
    cache_dir: str = field("", help="where trained parts are cached (default: $ACCORD_FACE_CACHE/world)")
    threads: int = field(1, help="torch CPU threads per training process")
    pool: PoolConfig = field(default_factory=PoolConfig, help="rendered training photos")
    clip: ClipConfig = field(default_factory=ClipConfig, help="world CLIP (text tower = base text encoder)")
    vae: VaeConfig = field(default_factory=VaeConfig, help="AutoencoderKL")
    unet: UnetConfig = field(default_factory=UnetConfig, help="base UNet")
    recognizer_a: RecognizerConfig = field(default_factory=RecognizerConfig, help="conditioning recognizer")
    recognizer_b: RecognizerConfig = field(default_factory=lambda: RecognizerConfig(seed=14, margin=0.35),
                                           help="evaluation recognizer (other architecture and seed)")
    detector: DetectorConfig = field(default_factory=DetectorConfig, help="landmark detector")
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="context / attribute judge")
    use_assets: bool = field(True, help="seed the build cache with the committed assets' parts whose recorded config "
                                        "matches (only the changed stages retrain); false: build from nothing")

    def model_fields(self) -> dict:
        """The fields that decide the trained weights (not where they are cached)."""
        d = asdict(self)
        for k in ("cache_dir", "threads", "use_assets"):
            d.pop(k)
        return d
