"""The subject / style LoRA path with ACCORD.

``train_lora(load_config(LoraTrainConfig, path, overrides))`` trains peft LoRA
on a Stable Diffusion UNet (optionally the text encoder and a learned token)
from 3-20 reference images, regularized by DDLoss (and PDLoss with a learned
token), and exports ``pytorch_lora_weights.safetensors`` for
``StableDiffusionPipeline.load_lora_weights``.
"""

from .config import LoraTrainConfig
from .train import train_lora

__all__ = ["LoraTrainConfig", "train_lora"]
