"""Models of the LoRA path: loading, peft adapters, the optional learned token, prompt encoding.

One place for the dtype policy: on GPU with mixed precision the frozen UNet /
VAE (and the text encoder when nothing in it trains) are cast to half
precision; every trainable weight (LoRA matrices, the learned token) stays fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .config import LoraTrainConfig


@dataclass
class LoraModels:
    """Everything one training step touches. ``unet_train`` is ``unet`` as prepared by accelerate."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    pretrained: str
    projection: torch.nn.Module | None = None     # CLIPTextModelWithProjection for PDLoss
    placeholder_ids: list[int] = field(default_factory=list)
    embedding_backup: torch.Tensor | None = None  # rows of the token table that must not move
    unet_train: torch.nn.Module | None = None

    def __post_init__(self):
        if self.unet_train is None:
            self.unet_train = self.unet

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def trains_text_encoder(self) -> bool:
        return any(p.requires_grad for p in self.text_encoder.parameters())


def load_models(cfg: LoraTrainConfig, device: torch.device | str = "cpu") -> LoraModels:
    """Load the base pipeline's components from ``cfg.pretrained_model`` (embedded:<size> resolved)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..tiny import projection_model_path, resolve_pretrained

    pretrained = resolve_pretrained(cfg.pretrained_model)
    try:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise ValueError(f"pretrained_model {cfg.pretrained_model!r} ({pretrained}) is not a loadable Stable "
                         f"Diffusion folder or hub id (offline? set HF_HUB_OFFLINE=1 and use a local folder): {err}"
                         ) from None
    if len(tokenizer) < 100:  # offline CLIPTokenizer.from_pretrained can silently return an empty vocab
        raise ValueError(f"the tokenizer of {pretrained} has only {len(tokenizer)} entries: it did not load")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False).eval()
    models = LoraModels(unet, vae, text_encoder, tokenizer, scheduler, pretrained)
    if cfg.textual_inversion.enabled and cfg.accord.lambda_pd > 0:
        path = cfg.accord.projection_model or projection_model_path(pretrained)
        if path is None:
            raise ValueError("PDLoss needs a CLIPTextModelWithProjection sharing the text tower: set "
                             "accord.projection_model (e.g. openai/clip-vit-large-patch14 for SD1.5) or accord.lambda_pd=0")
        from transformers import CLIPTextModelWithProjection

        models.projection = CLIPTextModelWithProjection.from_pretrained(path).requires_grad_(False).eval()
    if cfg.textual_inversion.enabled:
        add_learned_token(models, cfg.textual_inversion.token, cfg.textual_inversion.initializer)
    add_lora(models, cfg)
    return to_device(models, device, cfg.precision.mixed_precision)


def add_learned_token(models: LoraModels, token: str, initializer: str) -> None:
    """Textual inversion: a new token initialised from ``initializer``; only its row trains.

    The projection model (PDLoss) shares the same embedding table, so f_p follows the token.
    """
    tok = models.tokenizer
    if tok.add_tokens(token) == 0:
        raise ValueError(f"textual_inversion.token {token!r} is already in the tokenizer: pick another")
    init_ids = tok.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"textual_inversion.initializer {initializer!r} must be a single token, got {len(init_ids)}")
    models.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
    table = models.text_encoder.get_input_embeddings()
    new_id = tok.convert_tokens_to_ids(token)
    with torch.no_grad():
        table.weight[new_id] = table.weight[init_ids[0]].clone()
    table.weight.requires_grad_(True)
    models.placeholder_ids = [new_id]
    models.embedding_backup = table.weight.detach().clone()
    if models.projection is not None:
        models.projection.text_model.embeddings.token_embedding = table


def restore_frozen_embeddings(models: LoraModels) -> None:
    """After an optimizer step: put back every token row except the learned one(s)."""
    if models.embedding_backup is None:
        return
    weight = models.text_encoder.get_input_embeddings().weight
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[models.placeholder_ids] = False
    with torch.no_grad():
        weight[keep] = models.embedding_backup.to(weight)[keep]


def add_lora(models: LoraModels, cfg: LoraTrainConfig) -> None:
    """peft LoRA on the UNet attention projections (and optionally the text encoder)."""
    from peft import LoraConfig

    lc = cfg.lora
    init = True if lc.init == "default" else "gaussian"
    models.unet.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, init_lora_weights=init,
                                       target_modules=list(lc.unet_targets)))
    if lc.train_text_encoder:
        check_text_encoder_lora_support()
        models.text_encoder.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, init_lora_weights=init,
                                                   target_modules=list(lc.text_encoder_targets)))


def check_text_encoder_lora_support() -> None:
    """transformers' adapter API (used by ``add_adapter`` here and by diffusers' ``load_lora_weights`` for the
    text encoder) refuses peft older than its ``MIN_PEFT_VERSION``; say so before any work starts."""
    import importlib.metadata

    from packaging import version
    from transformers.integrations import peft as hf_peft

    have, need = importlib.metadata.version("peft"), getattr(hf_peft, "MIN_PEFT_VERSION", "0")
    if version.parse(have) < version.parse(need):
        raise ValueError(f"lora.train_text_encoder=true needs peft>={need} with this transformers (installed: "
                         f"peft {have}); diffusers could not load the exported text-encoder LoRA either. "
                         "Set lora.train_text_encoder=false (UNet LoRA + textual_inversion still work)")


def to_device(models: LoraModels, device: torch.device | str, mixed_precision: str) -> LoraModels:
    """Move to ``device``; frozen weights to half precision on GPU, trainable ones fp32."""
    from diffusers.training_utils import cast_training_params

    from ..sections import accelerate_precision

    device = torch.device(device)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerate_precision(mixed_precision,
                                                                                     device.type == "cuda"))
    dtype = half if half is not None else torch.float32
    models.unet.to(device, dtype=dtype)
    models.vae.to(device, dtype=dtype)
    te_dtype = torch.float32 if models.trains_text_encoder else dtype
    models.text_encoder.to(device, dtype=te_dtype)
    if models.projection is not None:
        models.projection.to(device, dtype=torch.float32)
    cast_training_params([models.unet, models.text_encoder], dtype=torch.float32)
    return models


def trainable_parameters(models: LoraModels, lr: float, ti_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: LoRA weights (lr, decay) and the token table (ti_lr, no decay)."""
    table = models.text_encoder.get_input_embeddings().weight
    lora = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad and p is not table]
    groups = [{"params": lora, "lr": lr, "weight_decay": weight_decay}]
    if models.placeholder_ids:
        groups.append({"params": [table], "lr": ti_lr, "weight_decay": 0.0})
    return groups


def tokenize(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_prompts(models: LoraModels, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text-encoder hidden states (N, L, D); differentiable where the text encoder trains."""
    ids = tokenize(models.tokenizer, prompts, models.device)
    return models.text_encoder(ids)[0]


def project_prompts(models: LoraModels, prompts: list[str]) -> torch.Tensor:
    """Prompts -> CLIP joint-space text embeds (N, P) from the projection model (PDLoss's f_*)."""
    ids = tokenize(models.tokenizer, prompts, models.device)
    return models.projection(ids).text_embeds


@contextlib.contextmanager
def adapters_disabled(models: LoraModels, disable: bool = True) -> Iterator[None]:
    """The base model: LoRA off in the UNet and text encoder (the frozen reference of DDLoss)."""
    if not disable:
        yield
        return
    te_has = getattr(models.text_encoder, "peft_config", None)
    models.unet.disable_adapters()
    if te_has:
        models.text_encoder.disable_adapters()
    try:
        yield
    finally:
        models.unet.enable_adapters()
        if te_has:
            models.text_encoder.enable_adapters()
