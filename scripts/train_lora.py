#!/usr/bin/env python
"""Train a subject / style LoRA with ACCORD.

    python scripts/train_lora.py --config configs/lora_tiny.yaml output_dir=outputs/lora max_steps=4
    accelerate launch scripts/train_lora.py --config configs/lora_subject.yaml data.reference_dir=my_refs

Overrides are ``key.sub=value`` (YAML values); ``--help-config`` lists every key.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run from a checkout without `pip install -e .`: the repository root holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/lora_*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its help")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)

    from accord_face.config import ConfigError, describe, load_config
    from accord_face.lora import LoraTrainConfig, train_lora

    if args.help_config:
        print("\n".join(describe(LoraTrainConfig)))
        return 0
    try:
        cfg = load_config(LoraTrainConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        train_lora(cfg)
    except ValueError as err:  # data / model errors carry the file and what to do
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
