"""Typed config of the coupling testbed (``configs/testbed.yaml`` overrides it)."""

from __future__ import annotations

from dataclasses import dataclass

from accord_face.config import field


@dataclass
class BaseModelConfig:
    steps: int = field(2500, help="optimizer steps of base text-to-image training (from scratch)")
    batch_size: int = field(32, help="scenes per step, rendered on the fly")
    lr: float = field(1e-3, help="AdamW learning rate (linear warm-up over the first 200 steps)")
    ema_decay: float = field(0.995, help="EMA of the weights; the EMA model is the one used")
    caption_dropout: float = field(0.1, help="probability of an empty caption (classifier-free guidance)")
    checkpoint_every: int = field(100, help="steps between resumable checkpoints")
    threads: int = field(1, help="torch CPU threads (1: the machine is shared; 2 threads under contention ran 20x slower)")
    seed: int = field(0, help="init / data seed")


@dataclass
class JudgeConfig:
    steps: int = field(1000, help="classifier training steps on augmented renders")
    batch_size: int = field(48, help="renders per step")
    lr: float = field(2e-3, help="Adam learning rate")
    threshold: float = field(0.5, help="sigmoid threshold for 'shape present'")
    seed: int = field(1, help="seed")
    version: int = field(2, help="judge version (cache file judge_v<version>.pt); v1 lacked brightness/"
                                 "saturation-boost augmentation and misread fine-tuned samples")


@dataclass
class FinetuneConfig:
    steps: int = field(800, help="fine-tuning steps per run, equal in every arm (800 @ 1e-3: baseline fidelity >= 0.5 on a held-out seed)")
    lr: float = field(1e-3, help="AdamW learning rate on the whole UNet, equal in every arm")
    batch_size: int = field(6, help="reference images per step (sampled with replacement)")
    n_refs: int = field(6, help="reference images per reference set")
    ratios: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3],
                                help="target lambda_DD * L_DD / L_base ratios; lambda is calibrated once on the base model")
    variant_ratio: float = field(0.1, help="the ratio used by the variant arms")
    warmup_frac: float = field(0.5, help="fraction of steps over which the 'warmup' arm ramps lambda from 0")
    dd_samples_per_image: int = field(4, help="timesteps per sample in the 'multi_t' arm (stratified over [0, T))")


@dataclass
class EvalConfig:
    images_per_prompt: int = field(3, help="generated images per evaluation prompt and run")
    sample_steps: int = field(25, help="DDIM steps (eta = 1: ancestral; eta = 0 drifts off the tiny model's data manifold)")
    guidance: float = field(3.0, help="classifier-free guidance scale")


@dataclass
class TestbedConfig:
    out_dir: str = field("testbed_out", help="results, logs and plots land here")
    cache_dir: str = field("testbed_out/cache", help="base model / judge cache (reused across runs)")
    base: BaseModelConfig = field(default_factory=BaseModelConfig, help="base model training")
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="judge training")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, help="per-arm fine-tuning")
    eval: EvalConfig = field(default_factory=EvalConfig, help="generation + judging protocol")
    seeds: list[int] = field(default_factory=lambda: [0, 1], help="fine-tune/sampling seeds per reference set")
    ref_sets: list[int] = field(default_factory=lambda: [0, 1],
                                help="reference sets (0: context = square, 1: context = circle; seeds differ)")
    arms: list[str] = field(default_factory=list, help="arms to run; empty = all")
    threads: int = field(1, help="torch CPU threads for judge / arms")
    use_assets: bool = field(True, help="start from the committed base model / judge (accord_face/testbed/assets) "
                                        "when the cache is empty and their recorded config equals this one")

    def validate(self) -> None:
        if not self.seeds or not self.ref_sets:
            raise ValueError("testbed: need at least one seed and one reference set")
