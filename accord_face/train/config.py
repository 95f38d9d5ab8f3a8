"""The encoder trainer's config tree (``TrainConfig``) and the checks that run before any work.

Top-level keys other tools rely on: ``pretrained_model``, ``shards``,
``output_dir``, ``max_steps``. Everything else sits in sections; see
``configs/tiny.yaml`` for a complete example and ``describe(TrainConfig)`` for
every key with its help text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from ..config import ConfigError, Renamed, field
from ..sections import (CheckpointingConfig, LoggingConfig, OptimizerConfig, PrecisionConfig, ValidationConfig,
                        precision_value, report_to_value, resume_value)

__all__ = ["TrainConfig", "EncoderConfig", "DataConfig", "DropoutConfig", "LossConfig", "OptimizerConfig",
           "DeepSpeedSection", "EncoderCheckpointing", "LoggingConfig", "EncoderValidation", "PrecisionConfig",
           "DebugConfig", "ShardInfo", "preflight", "ENCODER_RENAMED"]

# The encoder trainer's names before the shared vocabulary (accord_face.sections); read for one release.
ENCODER_RENAMED = (
    Renamed("data.micro_batch_size", "train_batch_size"),
    Renamed("optim.lr", "optimizer.learning_rate"),
    Renamed("optim.weight_decay", "optimizer.adam_weight_decay"),
    Renamed("optim.betas", ("optimizer.adam_beta1", "optimizer.adam_beta2"),
            lambda v: tuple(v) if isinstance(v, (list, tuple)) else v),
    Renamed("optim.warmup_steps", "optimizer.lr_warmup_steps"),
    Renamed("optim.grad_clip", "optimizer.max_grad_norm"),
    Renamed("optim.gradient_accumulation_steps", "optimizer.gradient_accumulation_steps"),
    Renamed("deepspeed.precision", "precision.mixed_precision", precision_value),
    Renamed("checkpoint.every_n_steps", "checkpointing.checkpointing_steps"),
    Renamed("checkpoint.keep_last", "checkpointing.checkpoints_total_limit"),
    Renamed("resume", "checkpointing.resume_from_checkpoint", resume_value),
    Renamed("logging.every_n_steps", "logging.logging_steps"),
    Renamed("logging.tensorboard", "logging.report_to", report_to_value),
    Renamed("validation.every_n_steps", "validation.validation_steps"),
    Renamed("validation.prompts", "validation.validation_prompts"),
)


@dataclass
class EncoderConfig:
    kind: Literal["faceid", "faceid_plus", "faceid_plusv2", "faceid_portrait"] = field(
        "faceid", help="FaceID family member (accord_face.encoder.ENCODERS): faceid, faceid_plus / faceid_plusv2 "
                       "(+ CLIP face crop; v2 with the shortcut), faceid_portrait (n photos x num_tokens)")
    id_embed_dim: int = field(128, help="face embedding size; must equal the shards' manifest embedding_dim "
                                        "(sface 128, arcface 512)")
    num_tokens: int = field(4, help="identity tokens K fed to the decoupled cross-attention (4 or 16)")
    hidden_dim: int = field(1024, help="MLP hidden size; a multiple of id_embed_dim (diffusers infers it)")
    ip_scale: float = field(1.0, help="adapter scale during training")
    image_encoder_path: str = field("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", help=(
        "FaceID-Plus: frozen CLIPVisionModelWithProjection (hub id, folder, or embedded:clip-vision)"))
    image_encoder_subfolder: str = field("", help="subfolder of image_encoder_path (h94/IP-Adapter: models/image_encoder)")
    s_scale: float = field(1.0, help="Plus-V2 shortcut weight during training (tokens + s_scale * resampler)")
    num_photos: int = field(1, help="Portrait: up to n photos of the same person per sample (1..n drawn per step)")
    reference: Literal["self", "other_photo"] = field(
        "self", help="identity inputs from the denoised photo itself (self), or from another photo of the same "
                     "person (other_photo: needs person_id in the shards; keeps the adapter from copying the photo)")

    def validate(self) -> None:
        if self.kind.startswith("faceid_plus") and self.num_tokens != 4:
            raise ValueError(f"encoder.num_tokens must be 4 for {self.kind} (diffusers loads FaceID-Plus with 4)")
        if self.num_photos < 1 or (self.num_photos > 1 and self.kind != "faceid_portrait"):
            raise ValueError("encoder.num_photos must be >= 1, and > 1 only with kind=faceid_portrait")
        if self.hidden_dim % self.id_embed_dim:
            raise ValueError(f"encoder.hidden_dim {self.hidden_dim} must be a multiple of "
                             f"encoder.id_embed_dim {self.id_embed_dim}")
        if self.num_tokens < 1:
            raise ValueError("encoder.num_tokens must be >= 1")
        if self.reference == "other_photo" and self.kind == "faceid_portrait":
            raise ValueError("encoder.reference=other_photo is for faceid / faceid_plus(v2); Portrait already "
                             "draws other photos of the person (encoder.num_photos)")


@dataclass
class IdentityLoraSection:
    rank: int = field(0, help="identity LoRA on the UNet, trained jointly with the adapter (0 = off; the released "
                              "FaceID / Plus / Plus-V2 models use 128)")
    alpha: float = field(0.0, help="LoRA alpha; 0 = rank (scale 1, as the reference LoRALinearLayer)")
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                               help="UNet attention projections (peft target_modules, self- and cross-attention)")

    def validate(self) -> None:
        if self.rank < 0 or self.alpha < 0:
            raise ValueError("lora.rank and lora.alpha must be >= 0")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty: name the UNet modules to adapt (e.g. [to_q, to_k, to_v, to_out.0])")


@dataclass
class DataConfig:
    num_workers: int = field(0, help="DataLoader workers per rank (shards are split by worker too)")
    shuffle_buffer: int = field(256, help="sample shuffle buffer (0/1 = shard order)")
    random_flip: bool = field(False, help="horizontal flip augmentation")
    embedding_key: Optional[str] = field(None, help="shard member holding the face embedding; None = manifest's")
    resampled: bool = field(False, help="draw shards with replacement (endless; no epochs)")
    latent_cache_mb: float = field(0.0, help="keep each distinct training image's VAE posterior (mean, std) in "
                                             "memory, up to this many MB per rank, and encode it once per run; "
                                             "the per-step draw is unchanged (0: off)")


@dataclass
class DropoutConfig:
    identity: float = field(0.05, help="share of samples whose identity is dropped (zero embedding)")
    caption: float = field(0.05, help="share of samples whose caption is dropped (empty string)")
    both: float = field(0.05, help="share of samples with both dropped")

    def validate(self) -> None:
        if min(self.identity, self.caption, self.both) < 0 or self.identity + self.caption + self.both > 1:
            raise ValueError("dropout shares must be >= 0 and sum to <= 1")


@dataclass
class LossConfig:
    lambda_dd: float = field(0.1, help="weight of the Denoising Decouple Loss (paper: 0.1-0.3)")
    lambda_pd: float = field(0.001, help="weight of the Prior Decouple Loss (paper: 0.001-0.003)")
    lambda_warmup_steps: int = field(0, help="ramp both lambdas linearly from 0 over this many steps")
    dd_batch_fraction: float = field(1.0, help="share of the micro batch that gets DDLoss (cost knob)")
    dd_every_n_steps: int = field(1, help="compute DDLoss on every n-th step only (cost knob)")
    dd_reference: Literal["live", "frozen_initial"] = field(
        "live", help="model for the three no-grad DDLoss branches: the live model (paper) or the initial weights")
    dd_timesteps: Literal["shared", "stratified", "k_per_sample"] = field(
        "shared", help="DDLoss t: the base loss's (reuses the joint forward), stratified over [0,T), or k per sample")
    dd_k: int = field(2, help="timesteps per sample for dd_timesteps=k_per_sample")
    superclass_prompt: str = field("a photo of a person", help="c_s for PDLoss")
    pd_mapping: Literal["text_projection_mean", "text_projection_mean_tail"] = field(
        "text_projection_mean", help="f_p: CLIP text_projection of the mean identity token "
                                     "(_tail: of its last hidden_size dims, for SDXL's concatenated space)")
    lambda_id: float = field(0.0, help="weight of the identity loss on the predicted clean image (PuLID-style: "
                                       "1 - cos of the recognizer's embedding of VAE.decode(x0_hat) and the "
                                       "conditioning one; train/identity_loss.py); 0 = off")
    id_timestep_fraction: float = field(0.5, help="identity loss only where t < this share of the schedule "
                                                  "(x0_hat is a face there, not a blur)")
    id_recognizer: str = field("auto", help="recognizer of the identity loss: auto = the shards' own (world "
                                            "backend), or an ArcFace-template ONNX file (112 px)")

    def validate(self) -> None:
        if not 0 < self.dd_batch_fraction <= 1:
            raise ValueError("losses.dd_batch_fraction must lie in (0, 1]")
        if self.dd_every_n_steps < 1 or self.dd_k < 1:
            raise ValueError("losses.dd_every_n_steps and losses.dd_k must be >= 1")
        if self.lambda_dd < 0 or self.lambda_pd < 0 or self.lambda_id < 0:
            raise ValueError("loss weights must be >= 0")
        if not 0 < self.id_timestep_fraction <= 1:
            raise ValueError("losses.id_timestep_fraction must lie in (0, 1]")


@dataclass
class EncoderCheckpointing(CheckpointingConfig):
    checkpointing_steps: int = field(500, help="save a DeepSpeed checkpoint + exported adapter every n steps (and at "
                                               "the end); 0 = only at the end")


@dataclass
class EncoderValidation(ValidationConfig):
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a person",
                                                                   "a person on a beach, oil painting"],
                                          help="fixed validation prompts")
    enabled: bool = field(True, help="write validation grids at all")
    num_faces: int = field(2, help="fixed faces: the first n identities read from the shards")
    scales: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0], help="adapter scales (grid columns)")


@dataclass
class DeepSpeedSection:
    config: str = field("configs/deepspeed/zero2.json", help="DeepSpeed JSON (ZeRO settings); batch, optimizer "
                                                             "and precision keys are filled from this config")
    backend: Literal["auto", "gloo", "nccl"] = field("auto", help="process group backend (auto: gloo on CPU)")


@dataclass
class DebugConfig:
    kill_after_step: Optional[int] = field(None, help="test hook: SIGKILL this process right after this step "
                                                      "(simulates a crash; checkpoints are then resumed)")
    log_sample_keys: bool = field(False, help="write the sample keys each rank consumed to OUTPUT/samples-rankR.jsonl")
    kill_at: Optional[str] = field(None, help="test hook: SIGKILL at '<point>:<step>[:<rank>]', point one of "
                                              "backward, save (checkpoint files written, no COMPLETE yet), "
                                              "export (adapter written, not yet swapped in), finish")


@dataclass
class TrainConfig:
    pretrained_model: str = field("embedded:tiny", help="base pipeline: hub id, local folder or embedded:<size>")
    pretrained_model_path: str = field("", help="filled by the trainer in OUTPUT/config.yaml: the resolved "
                                                "local folder or hub id of pretrained_model (leave empty)")
    shards: str = field("", help="training shards: folder of *.tar, glob or brace pattern (scripts/prepare_shards.py)")
    output_dir: str = field("outputs/train", help="checkpoints, adapter/, logs/, samples/, config.yaml")
    max_steps: int = field(1000, help="optimizer steps")
    init_adapter: str = field("", help="start from an exported adapter folder (an earlier run's OUTPUT/adapter: "
                                       "same encoder kind, tokens and sizes) instead of a fresh encoder; fresh "
                                       "optimizer, step 0; its identity LoRA is not loaded; a resumed checkpoint wins")
    seed: int = field(0, help="global seed (noise, t and dropout are drawn per sample from (seed, step, key))")
    resolution: int = field(512, help="training image size (64 for the embedded tiny pipeline)")
    clip_model: str = field("auto", help="CLIPTextModelWithProjection for PDLoss: hub id, folder, or auto "
                                         "(embedded projection / SDXL text_encoder_2 / openai/clip-vit-large-patch14)")
    recognizer: str = field("auto", help="face recognizer the embeddings came from (auto: the shards' manifest)")
    train_batch_size: int = field(4, help="samples per rank per forward (micro batch)")
    export_format: Literal["diffusers", "comfyui"] = field(
        "diffusers", help="diffusers: OUTPUT/adapter for pipe.load_ip_adapter (always written); comfyui: also an "
                          "ip-adapter-faceid*_accord.safetensors for ComfyUI_IPAdapter_plus and tencent's IP-Adapter "
                          "(needs 512-d arcface embeddings, hidden_dim 1024, 4 or 16 tokens)")
    encoder: EncoderConfig = field(default_factory=EncoderConfig, help="identity encoder")
    lora: IdentityLoraSection = field(default_factory=IdentityLoraSection,
                                      help="identity LoRA trained in the same engine (FaceID's released recipe)")
    data: DataConfig = field(default_factory=DataConfig, help="shard reading")
    dropout: DropoutConfig = field(default_factory=DropoutConfig, help="condition dropout")
    losses: LossConfig = field(default_factory=LossConfig, help="ACCORD losses")
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, help="optimizer (shared vocabulary)")
    precision: PrecisionConfig = field(default_factory=PrecisionConfig, help="precision (shared vocabulary)")
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection, help="DeepSpeed")
    checkpointing: EncoderCheckpointing = field(default_factory=EncoderCheckpointing,
                                                help="checkpoints (shared vocabulary)")
    logging: LoggingConfig = field(default_factory=LoggingConfig, help="logging (shared vocabulary)")
    validation: EncoderValidation = field(default_factory=EncoderValidation,
                                          help="validation grids (shared vocabulary)")
    debug: DebugConfig = field(default_factory=DebugConfig, help="test hooks")

    RENAMED: ClassVar[tuple] = ENCODER_RENAMED

    def validate(self) -> None:
        if self.max_steps < 1 or self.train_batch_size < 1:
            raise ValueError("max_steps and train_batch_size must be >= 1")
        if self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 8")
        if self.data.latent_cache_mb < 0:
            raise ValueError(f"data.latent_cache_mb is {self.data.latent_cache_mb}; use 0 (off) or a size in MB")
        if self.losses.lambda_id > 0 and self.data.random_flip:
            raise ValueError("losses.lambda_id > 0 places the face crop by the photo's stored landmarks, which a "
                             "flip would mirror: set data.random_flip=false")
        if self.export_format == "comfyui":
            from ..export_formats import ipadapter_config_problems

            e = self.encoder
            problems = ipadapter_config_problems(e.id_embed_dim, e.hidden_dim, e.num_tokens, e.kind)
            if problems:
                raise ValueError("export_format=comfyui: ComfyUI_IPAdapter_plus / tencent IP-Adapter could not load "
                                 "this adapter: " + "; ".join(problems) + " (or use export_format=diffusers)")


@dataclass
class ShardInfo:
    """What preflight learned about the shards."""

    urls: list[str]
    embedding_key: Optional[str]
    embedding_dim: Optional[int]
    recognizer: dict
    face_crop_size: Optional[int] = None   # FaceID-Plus: aligned face crops of this size (the CLIP image size)


def preflight(cfg: TrainConfig) -> ShardInfo:
    """Checks that need the file system; run before any model is loaded or process group started.

    Raises ConfigError naming the key: no shards at ``shards``; manifest
    ``embedding_dim`` != ``encoder.id_embed_dim``; a frozen-initial DDLoss
    reference under ZeRO-3 (parameters are partitioned, see models.py).
    """
    import json
    from pathlib import Path

    from ..data import list_shards, read_manifest

    if not cfg.shards:
        raise ConfigError("'shards' is empty: set shards=<folder of *.tar> (write them with scripts/prepare_shards.py)")
    from ..checks import UsageError, check_hub_reachable

    try:  # an uncached hub id under HF_HUB_OFFLINE=1 fails now, not after the other models loaded
        check_hub_reachable(cfg.pretrained_model, "pretrained_model")
        check_hub_reachable(cfg.clip_model, "clip_model", probe="config.json")
    except UsageError as err:
        raise ConfigError(str(err)) from None
    try:
        urls = list_shards(cfg.shards)
    except FileNotFoundError as err:
        raise ConfigError(f"'shards': {err}") from None
    manifest = read_manifest(Path(urls[0]).parent) or {}
    dim = manifest.get("embedding_dim")
    if dim is not None and int(dim) != cfg.encoder.id_embed_dim:
        raise ConfigError(
            f"embedding size mismatch: the shards' manifest ({Path(urls[0]).parent / 'manifest.json'}) says "
            f"embedding_dim={dim} but encoder.id_embed_dim={cfg.encoder.id_embed_dim}; set "
            f"encoder.id_embed_dim={dim} (and a hidden_dim that is a multiple of it) or use matching shards")
    rec = manifest.get("recognizer")
    rec = dict(rec) if isinstance(rec, dict) else {"name": rec}
    if cfg.recognizer != "auto":
        rec["name"] = cfg.recognizer
    rec.setdefault("name", None)
    rec.setdefault("backend", manifest.get("backend"))
    rec["embedding_dim"] = int(dim) if dim is not None else cfg.encoder.id_embed_dim
    if cfg.init_adapter:
        check_init_adapter(cfg)
    ds_path = Path(cfg.deepspeed.config)
    if not ds_path.is_file() and not ds_path.is_absolute():
        from ..train_flags import resolve_config_path

        bundled = Path(resolve_config_path(str(ds_path)))   # configs/ of the checkout or of a wheel install
        if bundled.is_file():
            cfg.deepspeed.config = str(bundled)
            ds_path = bundled
    if not ds_path.is_file():
        raise ConfigError(f"'deepspeed.config': {ds_path} does not exist (see configs/deepspeed/zero{{1,2,3}}.json)")
    try:
        stage = json.loads(ds_path.read_text()).get("zero_optimization", {}).get("stage", 0)
    except json.JSONDecodeError as err:
        raise ConfigError(f"'deepspeed.config': {ds_path} is not valid JSON ({err})") from None
    if stage == 3 and cfg.losses.dd_reference == "frozen_initial":
        raise ConfigError("'losses.dd_reference: frozen_initial' is not supported with ZeRO-3 "
                          f"({ds_path}); use dd_reference=live or ZeRO-1/2")
    return ShardInfo(urls=urls, embedding_key=cfg.data.embedding_key or manifest.get("embedding_key"),
                     embedding_dim=int(dim) if dim is not None else None, recognizer=rec)


def check_init_adapter(cfg: TrainConfig) -> dict:
    """``init_adapter``'s adapter_config.json, or ConfigError when it is no adapter folder or its encoder
    (kind, tokens, sizes) differs from ``cfg.encoder`` (the weights would not fit)."""
    from pathlib import Path

    from ..adapter import WEIGHT_NAME, load_adapter_config

    folder = Path(cfg.init_adapter)
    try:
        info = load_adapter_config(folder)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"'init_adapter': {err}") from None
    if not (folder / WEIGHT_NAME).is_file():
        raise ConfigError(f"'init_adapter': {folder / WEIGHT_NAME} not found (export the run again)")
    e = cfg.encoder
    want = {"encoder": e.kind, "num_tokens": e.num_tokens, "id_embed_dim": e.id_embed_dim}
    diff = [f"{k}={info.get(k)!r} there, {v!r} here" for k, v in want.items() if info.get(k) != v]
    if diff:
        raise ConfigError(f"'init_adapter': {folder} does not fit this encoder ({'; '.join(diff)}); set the "
                          "encoder section as that run had it or start fresh (init_adapter='')")
    return info

