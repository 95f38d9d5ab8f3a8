"""The trainers' command lines: ``key.sub=value`` overrides plus diffusers-example flags.

Both trainers accept the flag names of diffusers' example scripts (``train_dreambooth_lora.py``):

    --output_dir X  --max_train_steps N  --learning_rate 1e-4  --train_batch_size 4  --seed 0
    --pretrained_model_name_or_path ID  --resolution 512  --checkpointing_steps 500
    --checkpoints_total_limit 2  --resume_from_checkpoint latest  --mixed_precision no|fp16|bf16
    --report_to tensorboard|wandb|none  --validation_prompt TEXT  --rank 4 (LoRA)  --with_prior_preservation (LoRA)

each mapped to the same config key in both trainers (``SHARED_FLAGS``, the sections of
``accord_face.sections``; plus ``ENCODER_FLAGS`` / ``LORA_FLAGS`` for each trainer's own); any other
``--some.key value`` or ``--some_key=value`` becomes the override ``some.key=value``, so
every config key is a flag too. Unknown keys fail in the config layer with "did you mean".
"""

from __future__ import annotations

import json
from typing import Callable, Union

__all__ = ["SHARED_FLAGS", "ENCODER_FLAGS", "LORA_FLAGS", "flags_to_overrides", "split_argv", "resolve_config_path",
           "config_dirs"]

Mapping = Union[str, Callable[[str], list[str]]]   # key, or value -> overrides


def _listed(key: str) -> Callable[[str], list[str]]:
    return lambda value: [f"{key}={json.dumps([value])}"]


# diffusers' example flags, the same keys in both trainers (accord_face.sections): --X sets <section>.X.
SHARED_FLAGS: dict[str, Mapping] = {
    "pretrained_model_name_or_path": "pretrained_model",
    "train_batch_size": "train_batch_size",
    "max_train_steps": "max_steps",
    **{name: f"optimizer.{name}" for name in ("learning_rate", "adam_weight_decay", "adam_beta1", "adam_beta2",
                                              "adam_epsilon", "lr_scheduler", "lr_warmup_steps", "max_grad_norm",
                                              "gradient_accumulation_steps")},
    **{name: f"checkpointing.{name}" for name in ("checkpointing_steps", "checkpoints_total_limit",
                                                  "resume_from_checkpoint")},
    "mixed_precision": "precision.mixed_precision",
    "logging_steps": "logging.logging_steps",
    "report_to": "logging.report_to",
    "validation_steps": "validation.validation_steps",
    "validation_prompt": _listed("validation.validation_prompts"),
    "num_inference_steps": "validation.num_inference_steps",
    "export_format": "export_format",
}

ENCODER_FLAGS: dict[str, Mapping] = {
    **SHARED_FLAGS,
    "dataloader_num_workers": "data.num_workers",
    "pretrained_ip_adapter_path": "init_adapter",          # IP-Adapter's tutorial_train.py
}

LORA_FLAGS: dict[str, Mapping] = {
    **SHARED_FLAGS,
    "instance_data_dir": "data.reference_dir",
    "instance_prompt": "data.instance_prompt",
    "class_prompt": "prior.class_prompt",
    "class_data_dir": "prior.class_dir",
    "num_class_images": "prior.num_images",
    "prior_loss_weight": "prior.loss_weight",
    "with_prior_preservation": "prior.enabled",
    "train_text_encoder": "lora.train_text_encoder",
    "rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "num_validation_images": "validation.num_validation_images",
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
