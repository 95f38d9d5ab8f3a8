"""The trainers' command lines: ``key.sub=value`` overrides plus diffusers-example flags.

Both trainers accept the flag names of diffusers' example scripts (``train_dreambooth_lora.py``):

    --output_dir X  --max_train_steps N  --learning_rate 1e-4  --train_batch_size 4  --seed 0
    --pretrained_model_name_or_path ID  --resolution 512  --checkpointing_steps 500
    --checkpoints_total_limit 2  --resume_from_checkpoint latest  --mixed_precision no|fp16|bf16
    --rank 4 (LoRA)  --with_prior_preservation (LoRA)  --validation_prompt TEXT

each mapped to the trainer's own key (``ENCODER_FLAGS`` / ``LORA_FLAGS``); any other
``--some.key value`` or ``--some_key=value`` becomes the override ``some.key=value``, so
every config key is a flag too. Unknown keys fail in the config layer with "did you mean".
"""

from __future__ import annotations

import json
from typing import Callable, Union

__all__ = ["ENCODER_FLAGS", "LORA_FLAGS", "flags_to_overrides", "split_argv", "resolve_config_path", "config_dirs"]

Mapping = Union[str, Callable[[str], list[str]]]   # key, or value -> overrides


def _precision(key: str, names: dict[str, str]) -> Callable[[str], list[str]]:
    def convert(value: str) -> list[str]:
        if value not in names:
            raise ValueError(f"--mixed_precision {value}: use one of {', '.join(names)}")
        return [f"{key}={names[value]}"]
    return convert


def _resume(value: str) -> list[str]:
    return ["resume=auto" if value == "latest" else f"resume={value}"]


ENCODER_FLAGS: dict[str, Mapping] = {
    "pretrained_model_name_or_path": "pretrained_model",
    "train_batch_size": "data.micro_batch_size",
    "max_train_steps": "max_steps",
    "learning_rate": "optim.lr",
    "gradient_accumulation_steps": "optim.gradient_accumulation_steps",
    "max_grad_norm": "optim.grad_clip",
    "lr_warmup_steps": "optim.warmup_steps",
    "checkpointing_steps": "checkpoint.every_n_steps",
    "checkpoints_total_limit": "checkpoint.keep_last",
    "resume_from_checkpoint": _resume,
    "mixed_precision": _precision("deepspeed.precision", {"no": "fp32", "fp16": "fp16", "bf16": "bf16",
                                                         "auto": "auto"}),
    "validation_steps": "validation.every_n_steps",
    "validation_prompt": lambda v: [f"validation.prompts={json.dumps([v])}"],
    "dataloader_num_workers": "data.num_workers",
    "export_format": "export_format",
    "report_to": lambda v: _encoder_report_to(v),
}


def _encoder_report_to(value: str) -> list[str]:
    if value not in ("tensorboard", "none"):
        raise ValueError(f"--report_to {value}: the encoder trainer writes tensorboard or none "
                         "(OUTPUT/metrics.jsonl always)")
    return [f"logging.tensorboard={'true' if value == 'tensorboard' else 'false'}"]

LORA_FLAGS: dict[str, Mapping] = {
    "pretrained_model_name_or_path": "pretrained_model",
    "instance_data_dir": "data.reference_dir",
    "instance_prompt": "data.instance_prompt",
    "class_prompt": "prior.class_prompt",
    "class_data_dir": "prior.class_dir",
    "num_class_images": "prior.num_images",
    "prior_loss_weight": "prior.loss_weight",
    "with_prior_preservation": "prior.enabled",
    "train_text_encoder": "lora.train_text_encoder",
    "train_batch_size": "batch_size",
    "max_train_steps": "max_steps",
    "gradient_accumulation_steps": "gradient_accumulation",
    "checkpointing_steps": "checkpoint_every",
    "checkpoints_total_limit": "keep_checkpoints",
    "resume_from_checkpoint": lambda v: ["resume=false" if v in ("none", "no") else "resume=true"],
    "mixed_precision": _precision("mixed_precision", {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}),
    "rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "validation_prompt": lambda v: [f"validation.prompts={json.dumps([v])}"],
    "validation_steps": "validation.every",
    "center_crop": "data.center_crop",
    "random_flip": "data.random_flip",
}

BOOLEAN_FLAGS = {"with_prior_preservation", "train_text_encoder", "center_crop", "random_flip"}


def flags_to_overrides(tokens: list[str], table: dict[str, Mapping]) -> list[str]:
    """``["--output_dir", "X", "--rank=8", "a.b=1", "--with_prior_preservation"]`` -> overrides.

    ``key=value`` tokens pass through; ``--flag value`` / ``--flag=value`` go through ``table``
    (or become ``flag=value`` with the flag's dashes kept as written); a boolean diffusers flag
    without a value means true. ValueError names a flag that lacks its value.
    """
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not tok.startswith("--"):
            out.append(tok)
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")   # --export-format = --export_format (config keys never hold dashes)
        if not eq:
            nxt = tokens[i] if i < len(tokens) else None
            if name in BOOLEAN_FLAGS and (nxt is None or nxt.startswith("--") or "=" in nxt):
                value = "true"
            elif nxt is None or nxt.startswith("--"):
                raise ValueError(f"--{name} needs a value (--{name} VALUE or --{name}=VALUE)")
            else:
                value, i = nxt, i + 1
        mapped = table.get(name)
        if mapped is None:
            out.append(f"{name}={value}")
        elif callable(mapped):
            out.extend(mapped(value))
        else:
            out.append(f"{mapped}={value}")
    return out


def split_argv(argv: list[str], script_flags: dict[str, bool]) -> tuple[list[str], list[str]]:
    """(the script's own flags for argparse, everything else for ``flags_to_overrides``), order kept.

    ``script_flags`` maps each own flag to whether it takes a value (``--config``: True).
    """
    own: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if name in script_flags or name in ("-h", "--help"):
            own.append(tok)
            if script_flags.get(name) and "=" not in tok and i + 1 < len(argv):
                own.append(argv[i + 1])
                i += 1
        else:
            rest.append(tok)
        i += 1
    return own, rest


def config_dirs() -> list:
    """Where bundled configs live: ``configs/`` of a source checkout, and ``<prefix>/share/accord-face/configs``
    of a wheel install (pyproject ``data-files``)."""
    import sys
    from pathlib import Path

    return [Path(__file__).resolve().parents[1] / "configs", Path(sys.prefix) / "share" / "accord-face" / "configs"]


def resolve_config_path(name: str | None) -> str | None:
    """``--config tiny`` -> the bundled ``configs/tiny.yaml``; a path that exists is used as given.

    ``configs/x.yaml`` that does not exist relative to the working directory is looked up in the
    bundled folders too (a wheel install run from anywhere).
    """
    from pathlib import Path

    if name is None or Path(name).exists():
        return name
    rel = Path(name)
    if rel.parts and rel.parts[0] == "configs":
        rel = Path(*rel.parts[1:])
    for folder in config_dirs():
        for candidate in (folder / rel, folder / f"{rel}.yaml"):
            if candidate.is_file():
                return str(candidate)
    return name   # load_config names the missing file
