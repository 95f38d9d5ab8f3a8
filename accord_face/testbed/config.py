"""Typed config of the coupling testbed (``configs/testbed.yaml`` overrides it)."""

from __future__ import annotations

from dataclasses import dataclass

from accord_face.config import field


@dataclass
class BaseModelConfig:
    steps: int = field(3000, help="optimizer steps of base text-to-image training (from scratch)")
    batch_size: int = field(32, help="scenes per step, rendered on the fly")
    lr: float = field(1e-3, help="AdamW learning rate (linear warm-up over the first 200 steps)")
    ema_decay: float = field(0.995, help="EMA of the weights; the EMA model is the one used")
    caption_dropout: float = field(0.1, help="probability of an empty caption (classifier-free guidance)")
    checkpoint_every: int = field(100, help="steps between resumable checkpoints")
    threads: int = field(1, help="torch CPU threads (1: the machine is shared; 2 threads under contention ran 20x slower)")
    seed: int = field(0, help="init / data seed")
    no_background: float = field(0.25, help="share of captions without 'on a ... background'")
    one_object: float = field(0.15, help="share of two-object scenes captioned with one object only")
    no_colour: float = field(0.15, help="share of objects named without their colour ('a cross')")


@dataclass
class JudgeConfig:
    steps: int = field(1500, help="classifier training steps on augmented renders")
    batch_size: int = field(48, help="renders per step")
    lr: float = field(2e-3, help="Adam learning rate")
    threshold: float = field(0.5, help="sigmoid threshold for 'shape present'")
    seed: int = field(1, help="seed")
    eval_renders: int = field(1000, help="held-out renders of the judge's accuracy report")
    orange: float = field(0.3, help="probability that a training object is orange (orange cross = the target)")
    version: int = field(3, help="judge version (cache file judge_v<version>.safetensors); v3 = protocol v2's world "
                                 "(crosses, sks = orange cross); v2 added brightness/saturation-boost augmentation")


@dataclass
class FinetuneConfig:
    mode: str = field("full", help="'full' (every UNet weight) or 'lora' (peft LoRA on the UNet); set by the "
                                   "strength choice when strength.candidates is not empty")
    steps: int = field(400, help="fine-tuning steps per run, equal in every arm")
    lr: float = field(1e-4, help="AdamW learning rate, equal in every arm")
    lora_rank: int = field(8, help="LoRA rank (mode 'lora'); alpha = rank")
    batch_size: int = field(6, help="reference images per step (sampled with replacement)")
    n_refs: int = field(6, help="reference images per reference set")
    prior_weight: float = field(1.0, help="weight of the prior-preservation loss (arms with prior preservation)")
    n_class_images: int = field(48, help="class images ('a cross') generated once by the base model for prior preservation")
    ratios: list[float] = field(default_factory=lambda: [0.3, 1.0],
                                help="faithful ACCORD doses: lambda_DD * |grad L_DD| / |grad L_base| on the trainable "
                                     "parameters of the base model (gradient-norm calibration)")
    variant_ratio: float = field(1.0, help="the dose of the variant arms (accord_pp, multi_t, null_bg, frozen_ref)")
    calibration_batches: int = field(16, help="batches per reference set averaged by the lambda calibration")
    warmup_frac: float = field(0.5, help="fraction of steps over which the 'warmup' arm ramps lambda from 0")
    dd_samples_per_image: int = field(4, help="timesteps per sample in the 'multi_t' arm (stratified over [0, T))")

    def validate(self) -> None:
        if self.mode not in ("full", "lora"):
            raise ValueError(f"finetune.mode is {self.mode!r}; use 'full' or 'lora'")


@dataclass
class StrengthCandidate:
    mode: str = field("full", help="'full' or 'lora'")
    lr: float = field(1e-4, help="learning rate")
    steps: int = field(400, help="fine-tuning steps")
    lora_rank: int = field(8, help="LoRA rank (mode 'lora')")


@dataclass
class StrengthConfig:
    candidates: list[StrengthCandidate] = field(default_factory=list,
                                                help="fine-tune strengths tried on `baseline` before any ACCORD arm; "
                                                     "empty = use finetune as given")
    seeds: list[int] = field(default_factory=lambda: [90], help="held-out seeds (never used by the arms)")
    ref_sets: list[int] = field(default_factory=lambda: [0, 1], help="reference sets of the strength choice")
    min_fidelity: float = field(0.7, help="baseline must learn the target: target fidelity >= this")
    min_alignment_kept: float = field(0.9, help="and keep >= this share of the base model's unrelated-prompt alignment")
    arm: str = field("baseline", help="the arm the strength is chosen on: 'baseline', or 'baseline_pp' (DreamBooth "
                                      "with prior preservation, as DreamBooth trains)")


@dataclass
class EvalConfig:
    images_per_prompt: int = field(3, help="generated images per target / context prompt and run")
    unrelated_prompts: int = field(16, help="prompts without target or context (text alignment kept), 2 images each")
    sample_steps: int = field(25, help="DDIM steps (eta = 1: ancestral; eta = 0 drifts off the tiny model's data manifold)")
    guidance: float = field(3.0, help="classifier-free guidance scale")


@dataclass
class PowerConfig:
    relative_reduction: float = field(0.3, help="effect to detect: this share of baseline's coupling removed")
    power: float = field(0.8, help="wanted power (paired t-test, two-sided)")
    alpha: float = field(0.05, help="two-sided level")


@dataclass
class TestbedConfig:
    out_dir: str = field("testbed_out", help="results, logs and plots land here")
    archive: str = field("docs/testbed/archive", help="committed gzip copy of finished runs, strength choice and "
                                                      "calibration; restored on start, so a fresh checkout "
                                                      "resumes ('' = none)")
    cache_dir: str = field("testbed_out/cache", help="base model / judge / class-image cache (reused across runs)")
    base: BaseModelConfig = field(default_factory=BaseModelConfig, help="base model training")
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="judge training")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, help="per-arm fine-tuning")
    strength: StrengthConfig = field(default_factory=StrengthConfig, help="fine-tune strength, chosen first")
    eval: EvalConfig = field(default_factory=EvalConfig, help="generation + judging protocol")
    power: PowerConfig = field(default_factory=PowerConfig, help="power analysis of the paired design")
    seeds: list[int] = field(default_factory=lambda: [0], help="fine-tune/sampling seeds per reference set")
    ref_sets: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5],
                                help="reference sets (each: one context object and colour); paired across arms")
    arms: list[str] = field(default_factory=list, help="arms to run; empty = the default list (arms.DEFAULT_ARMS)")
    reference_arm: str = field("baseline", help="the arm every other is paired against ('paired_vs_baseline') and "
                                                "whose coupling the power analysis refers to")
    threads: int = field(1, help="torch CPU threads for judge / arms")
    stop_at: str = field("", help="'HH:MM' UTC: start no run that its arm's last duration says would end "
                                  "after it (the cache carries the rest to a later invocation); '' = no limit")
    prepare_only: bool = field(False, help="stop after base model, judge, strength choice and calibration "
                                           "(make testbed runs this first, then the runs in two processes)")
    base_asset: str = field("base_model", help="committed base model of this config: accord_face/testbed/assets/"
                                               "<name>.safetensors + <name>.json (a revision with another base "
                                               "names its own, e.g. base_model_long)")
    use_assets: bool = field(True, help="start from the committed base model / judge (accord_face/testbed/assets) "
                                        "when the cache is empty and their recorded config equals this one")

    def validate(self) -> None:
        if not self.seeds or not self.ref_sets:
            raise ValueError("testbed: need at least one seed and one reference set")
        from accord_face import stop_at

        stop_at.validate(self.stop_at)
        if self.reference_arm in ("", "base"):
            raise ValueError(f"reference_arm is {self.reference_arm!r}; name a fine-tuned arm (baseline, baseline_pp)")
        clash = sorted(set(self.seeds) & set(self.strength.seeds))
        if clash:
            raise ValueError(f"testbed: seeds {clash} are also strength.seeds; the strength choice needs held-out seeds")
