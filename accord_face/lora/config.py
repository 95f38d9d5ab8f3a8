"""Typed config of the LoRA path (``scripts/train_lora.py --config configs/lora_*.yaml``).

Top-level keys hold what a run changes most (``output_dir``, ``max_steps``,
``pretrained_model``, ``train_batch_size``); the sections group the rest. ``optimizer``,
``precision``, ``checkpointing``, ``logging`` and ``validation`` are the encoder trainer's
sections too (``accord_face.sections``; old names in ``LORA_RENAMED``). Every field carries help
text: ``accord_face.config.describe(LoraTrainConfig)`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from ..config import Renamed, field
from ..sections import (CheckpointingConfig, LoggingConfig, OptimizerConfig, PrecisionConfig, ValidationConfig,
                        precision_value, resume_value)


@dataclass
class DataConfig:
    reference_dir: Optional[str] = field(None, help="folder of 3-20 reference images (+ metadata.jsonl or per-image "
                                               ".txt captions); null with synthetic != 'none' makes one at run time")
    synthetic: Literal["none", "subject", "style"] = field(
        "none", help="make a synthetic reference set in <output_dir>/references (embedded default / tests)")
    synthetic_count: int = field(6, help="number of synthetic reference images")
    mode: Literal["subject", "style"] = field("subject", help="subject: target = instance prompt; "
                                              "style: target = 'in sks style', context = the content caption")
    instance_prompt: str = field("a photo of sks dog", help="target-only prompt c_p when metadata does not give one "
                                 "(style mode: e.g. 'in sks style')")
    joint_template: str = field("", help="joint prompt from {instance} and {caption}; empty: "
                                "'{instance} with {caption}' (subject) or '{caption} {instance}' (style)")
    context_template: str = field("{caption}", help="context-only prompt c_g from the caption")
    caption_templates: list[str] = field(default_factory=list, help="fallback captions (image i gets "
                                         "templates[i % n]) for images with neither metadata nor a .txt file")
    center_crop: bool = field(False, help="center crop instead of a random crop")
    random_flip: bool = field(True, help="horizontal flip with probability 0.5")
    crop_scale: float = field(0.9, help="random crop keeps this fraction of the shorter side (1.0 = no crop)")

    def validate(self):
        if self.reference_dir is None and self.synthetic == "none":
            raise ValueError("set data.reference_dir to a folder of reference images (or data.synthetic=subject)")
        if not 0.1 <= self.crop_scale <= 1.0:
            raise ValueError(f"data.crop_scale must lie in [0.1, 1], got {self.crop_scale}")


@dataclass
class LoraConfig:
    rank: int = field(4, help="LoRA rank r")
    alpha: float = field(4.0, help="LoRA alpha (scale = alpha / r); saved with the weights")
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                    help="UNet module names (peft target_modules) that get LoRA")
    train_text_encoder: bool = field(False, help="also put LoRA on the text encoder attention projections")
    text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
                                            help="text-encoder module names that get LoRA")
    init: Literal["default", "gaussian"] = field("gaussian", help="peft init_lora_weights (both start B = 0)")

    def validate(self):
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"lora.rank must be >= 1 and lora.alpha > 0, got {self.rank}, {self.alpha}")


@dataclass
class TextualInversionConfig:
    enabled: bool = field(False, help="learn a token embedding (then PDLoss applies, per the paper)")
    token: str = field("<sks>", help="placeholder token added to the tokenizer")
    initializer: str = field("dog", help="word whose embedding initialises the token")
    replace: str = field("sks", help="word replaced by the placeholder token in every prompt")
    learning_rate: float = field(5e-3, help="learning rate of the token embedding")


@dataclass
class AccordConfig:
    lambda_dd: float = field(0.1, help="weight of DDLoss (0 = plain DreamBooth-LoRA)")
    lambda_pd: float = field(0.002, help="weight of PDLoss (only with textual inversion)")
    reference: Literal["live", "frozen"] = field(
        "live", help="model for the target/context/empty branches: the trained model (paper) or the base "
        "with adapters disabled (a learned token keeps its current embedding there)")
    timesteps: Literal["shared", "stratified"] = field(
        "shared", help="shared: DDLoss reuses the base loss's x_t, t and joint output; stratified: its own "
        "stratified t per sample (one more forward with gradient)")
    t_per_sample: int = field(1, help="with timesteps=stratified: DDLoss t values per sample (the batch is "
                              "repeated, t stratified over all copies)")
    warmup_steps: int = field(0, help="lambda_dd ramps linearly from 0 over this many steps")
    every: int = field(1, help="compute DDLoss every k-th step (cost control)")
    fraction: float = field(1.0, help="fraction of the instance batch used for DDLoss (cost control)")
    superclass_prompt: str = field("a photo of a dog", help="c_s for PDLoss")
    projection_model: Optional[str] = field(None, help="CLIPTextModelWithProjection for PDLoss; null: the "
                                            "embedded pipeline's text_encoder_projection/")

    def validate(self):
        if self.lambda_dd < 0 or self.lambda_pd < 0:
            raise ValueError("accord.lambda_dd and accord.lambda_pd must be >= 0")
        if self.t_per_sample > 1 and self.timesteps != "stratified":
            raise ValueError("accord.t_per_sample > 1 needs accord.timesteps=stratified")
        if self.every < 1 or self.t_per_sample < 1 or not 0 < self.fraction <= 1:
            raise ValueError("accord.every must be >= 1 and accord.fraction in (0, 1]")


@dataclass
class PriorConfig:
    enabled: bool = field(False, help="prior preservation with class images made once by the base model")
    class_prompt: str = field("a photo of a dog", help="prompt of the class images")
    num_images: int = field(8, help="class images to generate (cached, reused across runs)")
    class_dir: Optional[str] = field(None, help="where class images are cached; null: <output_dir>/class_images")
    loss_weight: float = field(1.0, help="weight of the class half's denoising loss")
    inference_steps: int = field(25, help="sampling steps used to make class images")


@dataclass
class LoraValidation(ValidationConfig):
    validation_steps: int = field(100, help="write a grid every k steps (and at the end); 0 = only at the end")
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of sks dog",
                                                                   "a photo of sks dog on a beach"],
                                          help="prompts of the validation grid (one row each)")
    num_validation_images: int = field(2, help="images per prompt (columns of the grid)")

    def validate(self) -> None:
        super().validate()
        if self.num_validation_images < 1:
            raise ValueError("num_validation_images must be >= 1")


@dataclass
class LoraCheckpointing(CheckpointingConfig):
    checkpointing_steps: int = field(100, help="write a resumable checkpoint (accelerate save_state) and the "
                                               "export every k steps, and at the end; 0 = only at the end")


@dataclass
class LoraPrecision(PrecisionConfig):
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(
        "no", help="no = fp32; fp16 / bf16: frozen weights in half precision on GPU (LoRA weights and loss stay "
                   "fp32); auto = bf16 where supported, else fp16 on GPU, fp32 on CPU")


# The LoRA trainer's names before the shared vocabulary (accord_face.sections); read for one release.
LORA_RENAMED = (
    Renamed("batch_size", "train_batch_size"),
    Renamed("gradient_accumulation", "optimizer.gradient_accumulation_steps"),
    Renamed("learning_rate", "optimizer.learning_rate"),
    Renamed("weight_decay", "optimizer.adam_weight_decay"),
    Renamed("max_grad_norm", "optimizer.max_grad_norm"),
    Renamed("mixed_precision", "precision.mixed_precision", precision_value),
    Renamed("checkpoint_every", "checkpointing.checkpointing_steps"),
    Renamed("keep_checkpoints", "checkpointing.checkpoints_total_limit"),
    Renamed("resume", "checkpointing.resume_from_checkpoint", resume_value),
    Renamed("log_every", "logging.logging_steps"),
    Renamed("report_to", "logging.report_to"),
    Renamed("validation.every", "validation.validation_steps"),
    Renamed("validation.prompts", "validation.validation_prompts"),
    Renamed("validation.images_per_prompt", "validation.num_validation_images"),
    Renamed("validation.inference_steps", "validation.num_inference_steps"),
)


@dataclass
class LoraTrainConfig:
    pretrained_model: str = field("embedded:tiny", help="diffusers SD1.x folder or hub id; embedded:<size> "
                                  "builds a random-weight one offline")
    output_dir: str = field("outputs/lora", help="run folder: config.yaml, lora/, checkpoints/step-N/, "
                                                 "samples/step-N.png, metrics.jsonl, logs/ (TensorBoard)")
    max_steps: int = field(400, help="optimizer steps")
    train_batch_size: int = field(1, help="instance images per step and process (prior preservation adds as "
                                          "many class images)")
    resolution: Optional[int] = field(None, help="training resolution; null: the UNet sample size x VAE factor")
    seed: int = field(0, help="seed of data order, noise and timesteps")
    export_format: Literal["diffusers", "kohya", "comfyui"] = field(
        "diffusers", help="diffusers: lora/pytorch_lora_weights.safetensors for pipe.load_lora_weights (always "
                          "written); kohya (= comfyui): also lora/lora_kohya.safetensors (lora_unet_* keys, scalar "
                          ".alpha) for ComfyUI, A1111 and kohya tools")
    data: DataConfig = field(default_factory=DataConfig, help="reference images and prompts")
    lora: LoraConfig = field(default_factory=LoraConfig, help="LoRA placement")
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig,
                                                      help="optional learned token")
    accord: AccordConfig = field(default_factory=AccordConfig, help="ACCORD losses")
    prior: PriorConfig = field(default_factory=PriorConfig, help="prior preservation")
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig,
                                       help="optimizer of the LoRA weights (shared vocabulary)")
    precision: LoraPrecision = field(default_factory=LoraPrecision, help="precision (shared vocabulary)")
    checkpointing: LoraCheckpointing = field(default_factory=LoraCheckpointing, help="checkpoints (shared vocabulary)")
    logging: LoggingConfig = field(default_factory=LoggingConfig, help="logging (shared vocabulary)")
    validation: LoraValidation = field(default_factory=LoraValidation, help="validation grids (shared vocabulary)")

    RENAMED: ClassVar[tuple] = LORA_RENAMED

    def validate(self):
        if self.max_steps < 1 or self.train_batch_size < 1:
            raise ValueError("max_steps and train_batch_size must be >= 1")
