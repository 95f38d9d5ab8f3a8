"""``accord-face train-encoder`` (= ``scripts/train_encoder.py``): the encoder trainer's command line.

    accord-face train-encoder --config tiny shards=DIR --output_dir X --max_train_steps 30
    deepspeed --num_gpus 2 --module accord_face.train.cli --config sd15_faceid shards=DIR
    deepspeed scripts/train_encoder.py --config configs/tiny.yaml shards=DIR output_dir=X max_steps=30

Trailing ``key.sub=value`` arguments (or diffusers-style flags: ``--output_dir X``) override the
YAML; ``--describe`` lists every key.
"""

from __future__ import annotations

import argparse
import os
import sys


def _accelerator_defaults() -> None:
    """DeepSpeed picks its accelerator when imported: CPU unless CUDA is there."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    _accelerator_defaults()
    from accord_face.quiet import quiet_third_party, setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_third_party(verbose="--verbose" in argv)
    setup_logging()
    from accord_face.config import ConfigError, describe, load_config
    from accord_face.train import TrainConfig, train
    from accord_face.train_flags import ENCODER_FLAGS, flags_to_overrides, resolve_config_path, split_argv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any other arguments: key.sub=value overrides, or diffusers-style flags "
                                     "(--output_dir X --max_train_steps N ...; accord_face/train_flags.py)")
    parser.add_argument("--config", help="YAML config: a path, or the name of a bundled one (tiny, sd15_faceid, "
                        "sdxl_faceid)")
    parser.add_argument("--describe", action="store_true", help="print every config key with type, allowed "
                        "values, default and help, and exit")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings and loading bars")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    own, rest = split_argv(argv, {"--config": True, "--describe": False, "--verbose": False,
                                  "--local_rank": True})
    args = parser.parse_args(own)
    if args.describe:
        print("\n".join(describe(TrainConfig)))
        return 0
    try:
        overrides = flags_to_overrides(rest, ENCODER_FLAGS)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    args.config = resolve_config_path(args.config)
    from accord_face.train.errors import user_error

    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        result = train(cfg)
    except Exception as err:  # noqa: BLE001  (a cause the user can fix: one line, exit 2; else the traceback)
        line = user_error(err)
        if line is None:
            raise
        print(f"{'config error' if isinstance(err, ConfigError) else 'error'}: {line}", file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            sys.stderr.flush()
            os._exit(2)  # other ranks may wait in a collective: leave without interpreter teardown
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        if result.get("stopped"):
            print(f"stopped by {result['stopped']} at step {result['step']}: checkpoint saved; rerun the same "
                  f"command to resume; outputs in {result['output_dir']}")
        else:
            print(f"done: {result['step']} steps; adapter in {result['adapter']}; outputs in {result['output_dir']}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several ranks (notably ZeRO-3 on CPU) sometimes crash in interpreter teardown after all work is
        # done; everything is written and the ranks met at a final barrier, so leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
