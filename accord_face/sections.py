"""The config sections both trainers share, with the names of diffusers' example scripts.

    optimizer:      learning_rate, lr_scheduler, adam_weight_decay, adam_beta1, adam_beta2, adam_epsilon,
                    lr_warmup_steps, max_grad_norm, gradient_accumulation_steps
    checkpointing:  checkpointing_steps, checkpoints_total_limit, resume_from_checkpoint
    validation:     validation_steps, validation_prompts, num_inference_steps, guidance_scale
    precision:      mixed_precision (auto | no | fp16 | bf16)
    logging:        logging_steps, report_to (tensorboard | wandb | none), progress

plus ``train_batch_size`` at the top level of both configs. A diffusers flag ``--X`` sets the
key ``<section>.X`` (``accord_face.train_flags.SHARED_FLAGS``). A trainer subclasses a section
only to change defaults or add its own keys (``accord_face.train.config``, ``accord_face.lora.config``).

The keys each trainer used before (``optim.lr``, ``checkpoint_every``, ...) are listed in its
``RENAMED`` table and still read for one release, with one deprecation line each
(``accord_face.config.upgrade_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .config import Renamed, field

__all__ = ["OptimizerConfig", "LR_SCHEDULES", "lr_factor", "CheckpointingConfig", "ValidationConfig", "PrecisionConfig", "LoggingConfig",
           "Renamed", "accelerate_precision", "resume_value", "precision_value", "report_to_value"]


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based), diffusers' ``get_scheduler`` schedules:

        warm-up (t < W):  t / W
        constant:         1                                   (``constant_with_warmup``)
        linear:           max(0, (T - t) / (T - W))           (``linear``: 0 at t = T)
        cosine:           max(0, (1 + cos(pi * (t - W) / (T - W))) / 2)      (``cosine``, half a period)

    A pure function of the step, so a resumed run needs no scheduler state beyond the step.
    """
    import math

    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / span)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span))))


@dataclass
class OptimizerConfig:
    learning_rate: float = field(1e-4, help="AdamW learning rate")
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        "constant", help="after the warm-up: constant, linear to 0 or cosine to 0 at max_steps (diffusers' "
                         "constant_with_warmup / linear / cosine)")
    adam_weight_decay: float = field(1e-2, help="AdamW weight decay")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.999, help="AdamW beta2")
    adam_epsilon: float = field(1e-8, help="AdamW epsilon")
    lr_warmup_steps: int = field(0, help="linear learning-rate warm-up from 0 over this many optimizer steps")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0 = off)")
    gradient_accumulation_steps: int = field(1, help="micro batches per optimizer step")

    def validate(self) -> None:
        if self.learning_rate <= 0 or self.adam_weight_decay < 0 or self.adam_epsilon <= 0:
            raise ValueError("learning_rate and adam_epsilon must be > 0, adam_weight_decay >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("adam_beta1 and adam_beta2 must lie in [0, 1)")
        if self.lr_warmup_steps < 0 or self.max_grad_norm < 0 or self.gradient_accumulation_steps < 1:
            raise ValueError("lr_warmup_steps and max_grad_norm must be >= 0, gradient_accumulation_steps >= 1")


@dataclass
class CheckpointingConfig:
    checkpointing_steps: int = field(500, help="write a resumable checkpoint (and the export) every n steps, and "
                                               "at the end; 0 = only at the end")
    checkpoints_total_limit: int = field(2, help="newest complete checkpoints kept (older ones deleted); 0 = all")
    resume_from_checkpoint: str = field(
        "latest", help="latest = the newest complete checkpoint in OUTPUT/checkpoints (refused when OUTPUT holds a "
                       "run with another config), force = the same but accept a changed config, none = start "
                       "fresh, or a checkpoint folder")

    def validate(self) -> None:
        if self.checkpointing_steps < 0 or self.checkpoints_total_limit < 0:
            raise ValueError("checkpointing_steps and checkpoints_total_limit must be >= 0")
        if not self.resume_from_checkpoint:
            raise ValueError("resume_from_checkpoint is empty: use latest, force, none or a checkpoint folder")


@dataclass
class ValidationConfig:
    validation_steps: int = field(0, help="validation grid every n steps (and at the end); 0 = only at the end")
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a person"],
                                          help="fixed validation prompts (grid rows)")
    num_inference_steps: int = field(20, help="sampler steps of validation images")
    guidance_scale: float = field(5.0, help="classifier-free guidance of validation images")

    def validate(self) -> None:
        if self.validation_steps < 0 or self.num_inference_steps < 1:
            raise ValueError("validation_steps must be >= 0 and num_inference_steps >= 1")


@dataclass
class PrecisionConfig:
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(
        "auto", help="frozen weights' compute dtype: no = fp32; auto = bf16 on GPUs that support it, else fp16 on "
                     "GPU, fp32 on CPU (half precision is used on GPU only)")


@dataclass
class LoggingConfig:
    logging_steps: int = field(10, help="log the loss terms (metrics.jsonl, trackers) every n steps")
    report_to: Literal["tensorboard", "wandb", "none"] = field(
        "tensorboard", help="tracker besides OUTPUT/metrics.jsonl: TensorBoard events in OUTPUT/logs, Weights & "
                            "Biases (needs wandb installed), or none")
    progress: bool = field(True, help="tqdm progress bar on the main process")

    def validate(self) -> None:
        if self.logging_steps < 1:
            raise ValueError("logging_steps must be >= 1")
        if self.report_to == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ValueError("report_to=wandb: wandb is not installed (pip install wandb); "
                                 "or use report_to=tensorboard / none")


def accelerate_precision(mixed_precision: str, cuda: bool) -> str:
    """``mixed_precision`` -> what runs: "no" | "fp16" | "bf16" (half precision on GPU only; auto = bf16 where
    the GPU supports it, else fp16; "fp32" is the old name of "no")."""
    if not cuda or mixed_precision in ("no", "fp32"):
        return "no"
    if mixed_precision == "auto":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return mixed_precision


# ---------------------------------------------------------------- value conversions of old keys
def resume_value(value: Any) -> Any:
    """Old ``resume`` (encoder: auto | force | none | folder; LoRA: true | false) -> resume_from_checkpoint."""
    return {True: "latest", False: "none", "auto": "latest"}.get(value, value) if isinstance(value, (bool, str)) \
        else value


def precision_value(value: Any) -> Any:
    """Old precision names (fp32 | fp16 | bf16 | auto) -> mixed_precision (no | fp16 | bf16 | auto)."""
    return "no" if value == "fp32" else value


def report_to_value(value: Any) -> Any:
    """Old ``logging.tensorboard: true | false`` -> report_to tensorboard | none."""
    return {True: "tensorboard", False: "none"}.get(value, value) if isinstance(value, bool) else value
