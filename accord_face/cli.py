"""`accord-face` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _offline_defaults() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from .tiny import save_pipeline

    path = save_pipeline(args.out, size=args.size, seed=args.seed)
    print(f"embedded '{args.size}' pipeline (seed {args.seed}) written to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .smoke import run_loss_smoke
    from .tiny import resolve_pretrained

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = resolve_pretrained(args.pretrained)
    print(f"[demo] pipeline: {pretrained}")

    from diffusers import StableDiffusionPipeline
    import torch

    pipe = StableDiffusionPipeline.from_pretrained(pretrained, local_files_only=True)
    image = pipe("a photo of a person on a beach", num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out / "sample.png")
    print(f"[demo] sample image: {out / 'sample.png'}")

    result = run_loss_smoke(pretrained)
    (out / "loss_smoke.json").write_text(json.dumps(result, indent=2))
    print(f"[demo] ACCORD loss smoke: DDLoss {result['dd_loss']:.4g} (mean Delta_t {result['delta_mean']:.4g}), "
          f"PDLoss {result.get('pd_loss', float('nan')):.4g} -> {out / 'loss_smoke.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accord-face", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tiny", help="write an embedded (random-weight) SD-shaped pipeline to a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "sd15"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_tiny)

    p = sub.add_parser("demo", help="run the embedded-default flow end to end")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--pretrained", default="embedded:tiny")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
