"""Command line for shard preparation: ``python -m data_pipelines.prepare_shards --input DIR --output OUT``.

Flags are generated from ``PrepareConfig`` (one per field, help text from the field);
``--config FILE.yaml`` loads the same fields from YAML, flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from accord_face.config import ConfigError, load_config

from .prepare import AnalysisFailure, PrepareConfig, format_summary, prepare_shards


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="prepare_shards", description=__doc__)
    parser.add_argument("--config", help="YAML file with PrepareConfig fields (flags override it)")
    parser.add_argument("--summary-json", help="also write the run summary to this JSON file")
    hints = typing.get_type_hints(PrepareConfig)
    for f in dataclasses.fields(PrepareConfig):
        flag, tp = "--" + f.name.replace("_", "-"), hints[f.name]
        kwargs: dict = {"dest": f.name, "default": None, "help": f.metadata.get("help", "").replace("%", "%%")}
        if f.default is not dataclasses.MISSING:
            kwargs["help"] += f" (default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(args)
        elif tp in (int, float):
            kwargs["type"] = tp
        elif args and args[0] in (int, float):
            kwargs["type"] = args[0]
        parser.add_argument(flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    names = [f.name for f in dataclasses.fields(PrepareConfig)]
    overrides = [f"{n}={json.dumps(getattr(args, n))}" for n in names if getattr(args, n) is not None]
    cfg = load_config(PrepareConfig, args.config, overrides)
    return cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args, parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from accord_face.face import ModelNotFoundError
    from .journal import SettingsMismatch

    try:
        cfg = config_from_args(args)
        summary = prepare_shards(cfg)
    except (ConfigError, SettingsMismatch, ModelNotFoundError, FileNotFoundError) as err:
        parser.exit(2, f"prepare_shards: error: {err}\n")
    except AnalysisFailure as err:
        parser.exit(1, f"prepare_shards: error: {err}\n(committed work is kept: rerun to resume)\n")
    except Exception as err:
        from concurrent.futures.process import BrokenProcessPool

        from accord_face.train.errors import user_error
        from .distributed import PartitionFailure

        if isinstance(err, PartitionFailure):
            parser.exit(1, f"prepare_shards: error: {err}\n")
        if isinstance(err, BrokenProcessPool):
            parser.exit(2, "prepare_shards: error: a worker process died (killed, or out of memory); committed "
                           "shards are kept: rerun the same command to resume (fewer --workers if memory is short)\n")
        line = user_error(err)  # disk full, quota, read-only or unwritable --output: one line naming the path
        if line is None:
            raise
        parser.exit(2, f"prepare_shards: error: {line}\n")
    print(format_summary(summary))
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
