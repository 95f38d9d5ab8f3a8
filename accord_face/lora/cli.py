"""``accord-face train-lora`` (= ``scripts/train_lora.py``): the LoRA trainer's command line.

    accord-face train-lora --config lora_tiny --output_dir outputs/lora --max_train_steps 4
    accelerate launch -m accord_face.lora.cli --config lora_subject --instance_data_dir my_refs

Overrides are ``key.sub=value`` (YAML values) or diffusers-style flags (``--output_dir X``);
``--describe`` lists every key.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from accord_face.quiet import quiet_third_party, setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_third_party(verbose="--verbose" in argv)
    setup_logging()
    from accord_face.train_flags import LORA_FLAGS, flags_to_overrides, resolve_config_path, split_argv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config: a path, or the name of a bundled one (lora_tiny, "
                        "lora_subject, lora_style)")
    parser.add_argument("--describe", action="store_true", help="list every config key with type, allowed values, "
                        "default and help")
    parser.add_argument("--help-config", action="store_true", help=argparse.SUPPRESS)  # old name of --describe
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings and loading bars")
    own, rest = split_argv(argv, {"--config": True, "--describe": False, "--help-config": False, "--verbose": False})
    parser.epilog = ("Any other arguments: key.sub=value overrides, or diffusers-style flags "
                     "(--output_dir X --max_train_steps N --rank 8 ...; accord_face/train_flags.py)")
    args = parser.parse_args(own)

    from accord_face.checks import UsageError
    from accord_face.config import ConfigError, describe, load_config
    from accord_face.lora import LoraTrainConfig, train_lora

    if args.help_config:
        print("--help-config is deprecated (one release): use --describe", file=sys.stderr)
    if args.describe or args.help_config:
        print("\n".join(describe(LoraTrainConfig)))
        return 0
    try:
        cfg = load_config(LoraTrainConfig, resolve_config_path(args.config), flags_to_overrides(rest, LORA_FLAGS))
    except (ConfigError, ValueError) as err:
        print(f"config error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        result = train_lora(cfg)
    except (UsageError, ConfigError) as err:  # caught before any model loaded
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except ValueError as err:  # data / model errors carry the file and what to do
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.get("stopped") and int(os.environ.get("RANK", "0")) == 0:
        print(f"stopped by {result['stopped']} at step {result['step']}: checkpoint saved; rerun the same command "
              f"to resume; outputs in {result['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
