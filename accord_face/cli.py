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


def cmd_smoke(args: argparse.Namespace) -> int:
    from .smoke import run_loss_smoke
    from .tiny import resolve_pretrained

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = resolve_pretrained(args.pretrained)
    print(f"[smoke] pipeline: {pretrained}")

    from diffusers import StableDiffusionPipeline
    import torch

    pipe = StableDiffusionPipeline.from_pretrained(pretrained, local_files_only=True)
    image = pipe("a photo of a person on a beach", num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out / "sample.png")
    print(f"[smoke] sample image: {out / 'sample.png'}")

    result = run_loss_smoke(pretrained)
    (out / "loss_smoke.json").write_text(json.dumps(result, indent=2))
    print(f"[smoke] ACCORD loss smoke: DDLoss {result['dd_loss']:.4g} (mean Delta_t {result['delta_mean']:.4g}), "
          f"PDLoss {result.get('pd_loss', float('nan')):.4g} -> {out / 'loss_smoke.json'}")
    return 0


def _user_error(command: str, err: Exception) -> int:
    """One line on stderr, no traceback, exit code 2: for problems the user can fix."""
    message = " ".join(str(err).split())  # one line, whatever the exception text held
    print(f"accord-face {command}: error: {message}", file=sys.stderr)
    return 2


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def cmd_generate(args: argparse.Namespace) -> int:
    import logging

    from .config import ConfigError, from_dict
    from .pipeline import GenerateConfig, GenerateError, run_generate

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accord_face").setLevel(logging.INFO)
    keys = {k: v for k, v in vars(args).items() if k not in ("command", "func") and v is not None}
    try:
        summary = run_generate(from_dict(GenerateConfig, keys, source="command line"))
    except (GenerateError, ConfigError) as err:
        return _user_error("generate", err)
    print(f"[generate] {len(summary['images'])} image(s) + grid.png + generate.json -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import logging

    from .config import ConfigError, from_dict
    from .evaluate import EvaluateConfig, run_evaluate
    from .evaluate_report import compare_metrics, format_compare, load_metrics, plot_tradeoff_runs
    from .pipeline import GenerateError, atomic_write_text

    if args.compare:
        try:
            a, b = (load_metrics(p) for p in args.compare)
        except (OSError, ValueError) as err:
            return _user_error("evaluate", err)
        table = format_compare(compare_metrics(a, b), *args.compare)
        print(table)
        if args.out:  # optional: keep the table and both trade-off curves in one plot
            atomic_write_text(Path(args.out) / "compare.md", table + "\n")
            plot_tradeoff_runs(dict(zip(args.compare, (a, b))), Path(args.out) / "compare_tradeoff.png")
            print(f"[evaluate] compare.md + compare_tradeoff.png -> {args.out}")
        return 0
    args.out = args.out or "outputs/evaluate"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accord_face").setLevel(logging.INFO)
    keys = {k: v for k, v in vars(args).items() if k not in ("command", "func", "compare") and v is not None}
    try:
        result = run_evaluate(from_dict(EvaluateConfig, keys, source="command line"))
    except (GenerateError, ConfigError) as err:
        return _user_error("evaluate", err)
    o = result["overall"]
    print(f"[evaluate] {result['num_samples']} images: identity similarity {o['identity_similarity']:.4g}, "
          f"face not found {o['face_not_found_rate']:.2%}, CLIP-T {o['clip_t']:.4g} -> {args.out}/report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accord-face", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tiny", help="write an embedded (random-weight) SD-shaped pipeline to a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "sd15"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_tiny)

    p = sub.add_parser("smoke", help="training-free check: load a pipeline, sample once, evaluate both ACCORD "
                       "losses on real UNet outputs (the full demo flow is `make demo`)")
    p.add_argument("--out", default="outputs/smoke")
    p.add_argument("--pretrained", default="embedded:tiny")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("generate", help="zero-shot generation with an exported adapter and reference photo(s)")
    p.add_argument("--adapter", required=True, help="exported adapter folder (OUTPUT/adapter)")
    p.add_argument("--face", dest="faces", action="append", required=True, help="reference photo (repeatable)")
    p.add_argument("--prompt", dest="prompts", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--pretrained", help="base model; default: the one recorded in adapter_config.json")
    p.add_argument("--num-images", dest="num_images", type=int, help="images per prompt (seeds seed..seed+N-1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--scale", type=float, help="identity strength (IP-Adapter scale)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--resolution", type=int)
    p.add_argument("--device")
    p.add_argument("--face-backend", dest="face_backend", help="override the recorded face analyzer backend")
    p.add_argument("--face-model-root", dest="face_model_root")
    p.add_argument("--out", default="outputs/generate")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="identity / CLIP-T / coupling metrics of an adapter, or --compare A B")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print metric deltas of two evaluation folders")
    p.add_argument("--adapter")
    p.add_argument("--faces", help="folder: one sub-folder (or one photo) per identity")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--scales", type=_floats, help="comma-separated adapter scales, e.g. 0.3,0.6,1.0")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per pipeline call (default 8)")
    p.add_argument("--guidance", type=float)
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--pretrained")
    p.add_argument("--resolution", type=int)
    p.add_argument("--id-model", dest="id_model", help="identity analyzer backend (opencv-zoo | insightface)")
    p.add_argument("--id-model-root", dest="id_model_root")
    p.add_argument("--id-model-name", dest="id_model_name")
    p.add_argument("--clip-model", dest="clip_model", help="CLIP folder or hub id for CLIP-T ('none' skips)")
    p.add_argument("--shards", help="held-out shards for the coupling diagnostics")
    p.add_argument("--coupling-samples", dest="coupling_samples", type=int)
    p.add_argument("--coupling-timesteps", dest="coupling_timesteps", type=int)
    p.add_argument("--superclass")
    p.add_argument("--text-projection", dest="text_projection")
    p.add_argument("--device")
    p.add_argument("--out", help="output folder (default outputs/evaluate); with --compare: where to write "
                                 "compare.md and compare_tradeoff.png (nothing written without it)")
    p.set_defaults(func=cmd_evaluate)

    # Shard preparation: the same flags as scripts/prepare_shards.py (generated from PrepareConfig).
    from data_pipelines.prepare_shards import build_parser as _shard_parser

    p = _shard_parser(sub.add_parser("prepare-shards", help="photos + captions -> WebDataset shards with faces "
                                     "and identity embeddings"))
    p.set_defaults(func=cmd_prepare_shards, _parser=p)
    return parser


def cmd_prepare_shards(args: argparse.Namespace) -> int:
    import logging

    from data_pipelines.prepare_shards import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args, args._parser)


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
