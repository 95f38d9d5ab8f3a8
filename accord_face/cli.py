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


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def cmd_generate(args: argparse.Namespace) -> int:
    import logging

    from .config import ConfigError, from_dict
    from .pipeline import GenerateConfig, GenerateError, run_generate
    from .quiet import setup_logging

    setup_logging(logging.WARNING, project_level=logging.INFO)
    from .checks import UsageError

    keys = {k: v for k, v in vars(args).items() if k not in ("command", "func", "verbose") and v is not None}
    from .train.errors import disk_error

    try:
        summary = run_generate(from_dict(GenerateConfig, keys, source="command line"))
    except (GenerateError, ConfigError, UsageError) as err:
        return _user_error("generate", err)
    except OSError as err:  # disk full, ulimit -f, unwritable --out: one line; anything else is a bug
        line = disk_error(err, resumes="the start (images already written are rewritten)", output="--out")
        if line is None:
            raise
        return _user_error("generate", ValueError(line))
    print(f"[generate] {len(summary['images'])} image(s) + grid.png + generate.json -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import logging

    from .config import ConfigError, from_dict
    from .evaluate import EvaluateConfig, run_evaluate
    from .evaluate_report import compare_metrics, format_compare, load_metrics, plot_tradeoff_runs
    from .pipeline import GenerateError, atomic_write_text
    from .quiet import setup_logging

    if args.compare:
        from .evaluate_report import compare_settings, load_settings

        try:
            a, b = (load_metrics(p) for p in args.compare)
        except (OSError, ValueError) as err:
            return _user_error("evaluate", err)
        diff, blocking = compare_settings(*(load_settings(p) for p in args.compare))
        for key, va, vb in diff:
            print(f"[evaluate] setting {key} differs: A={_short(va)} B={_short(vb)}")
        if blocking and not args.force:
            return _user_error("evaluate", ValueError(
                f"{args.compare[0]} and {args.compare[1]} were measured with different {', '.join(blocking)}: "
                "their deltas compare different experiments; rerun one with the other's settings, or pass --force"))
        table = format_compare(compare_metrics(a, b), *args.compare)
        print(table)
        if args.out:  # optional: keep the table and both trade-off curves in one plot
            atomic_write_text(Path(args.out) / "compare.md", table + "\n")
            plot_tradeoff_runs(dict(zip(args.compare, (a, b))), Path(args.out) / "compare_tradeoff.png")
            print(f"[evaluate] compare.md + compare_tradeoff.png -> {args.out}")
        return 0
    args.out = args.out or "outputs/evaluate"
    setup_logging(logging.WARNING, project_level=logging.INFO)
    from .checks import UsageError

    keys = {k: v for k, v in vars(args).items() if k not in ("command", "func", "compare", "force", "verbose")
            and v is not None}
    from .train.errors import disk_error

    try:
        result = run_evaluate(from_dict(EvaluateConfig, keys, source="command line"))
    except (GenerateError, ConfigError, UsageError) as err:
        return _user_error("evaluate", err)
    except OSError as err:  # disk full, ulimit -f, unwritable --out: one line; anything else is a bug
        line = disk_error(err, resumes=f"the images measured so far ({args.out}/samples.jsonl)", output="--out")
        if line is None:
            raise
        return _user_error("evaluate", ValueError(line))
    o = result["overall"]
    print(f"[evaluate] {result['num_samples']} images: identity similarity {o['identity_similarity']:.4g}, "
          f"face not found {o['face_not_found_rate']:.2%}, CLIP-T {o['clip_t']:.4g} -> {args.out}/report.md")
    return 0


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help when it has a default worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text and "(default:" not in text
                and action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS and action.default != []):
            text += " (default: %(default)s)"
        return text


def _all_flags(parser: argparse.ArgumentParser) -> list[str]:
    flags = []
    for action in parser._actions:
        flags += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                flags += _all_flags(child)
    return sorted(set(flags))


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and a "did you mean" for misspelt flags and choices (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        from .checks import did_you_mean

        flags = _all_flags(self)
        if message.startswith("unrecognized arguments:"):
            message += "".join(did_you_mean(w.split("=")[0], flags) for w in message.split(":", 1)[1].split()
                               if w.startswith("--"))
        elif "invalid choice:" in message:
            import re

            m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
            if m:
                message += did_you_mean(m.group(1), re.findall(r"'?([\w.-]+)'?", m.group(2)))
        super().error(message)


def _from_config(p: argparse.ArgumentParser, cls, flag: str, name: str, **kwargs) -> None:
    """Add ``flag`` with help (and the shown default) taken from the dataclass field ``cls.name``."""
    import dataclasses

    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    shown = kwargs.pop("shown", default)
    help_text = kwargs.pop("help", f.metadata.get("help", ""))
    if shown not in (None, "", []) and "%(default)" not in help_text:
        help_text += f" (default: {shown})"
    p.add_argument(flag, dest=name, default=None, help=help_text, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import EvaluateConfig
    from .pipeline import GenerateConfig

    parser = Parser(prog="accord-face", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("build-tiny", help="write an embedded (random-weight) SD-shaped pipeline to a folder")
    p.add_argument("--out", required=True, help="folder to write the pipeline to")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "sd15"], help="model size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_build_tiny)

    p = sub.add_parser("smoke", help="training-free check: load a pipeline, sample once, evaluate both ACCORD "
                       "losses on real UNet outputs (the full demo flow is `make demo`)")
    p.add_argument("--out", default="outputs/smoke", help="output folder")
    p.add_argument("--pretrained", default="embedded:tiny", help="base pipeline: folder, hub id or embedded:<size>")
    p.set_defaults(func=cmd_smoke)

    G = GenerateConfig
    p = sub.add_parser("generate", help="zero-shot generation with an exported adapter and reference photo(s), "
                       "and/or a trained LoRA")
    _from_config(p, G, "--adapter", "adapter")
    _from_config(p, G, "--lora", "lora")
    _from_config(p, G, "--lora-scale", "lora_scale", type=float)
    _from_config(p, G, "--face", "faces", action="append", help="reference photo of the person (repeatable; "
                 "needs --adapter)")
    _from_config(p, G, "--prompt", "prompts", action="append", required=True, help="prompt (repeatable)")
    _from_config(p, G, "--negative-prompt", "negative_prompt")
    _from_config(p, G, "--pretrained", "pretrained")
    _from_config(p, G, "--num-images", "num_images", type=int)
    _from_config(p, G, "--seed", "seed", type=int)
    _from_config(p, G, "--scale", "scale", type=float)
    _from_config(p, G, "--steps", "steps", type=int)
    _from_config(p, G, "--guidance", "guidance", type=float)
    _from_config(p, G, "--resolution", "resolution", type=int)
    _from_config(p, G, "--device", "device")
    _from_config(p, G, "--face-backend", "face_backend")
    _from_config(p, G, "--face-model-root", "face_model_root")
    _from_config(p, G, "--clip-image-encoder", "clip_image_encoder")
    _from_config(p, G, "--s-scale", "s_scale", type=float)
    _from_config(p, G, "--out", "out")
    p.set_defaults(func=cmd_generate)

    E = EvaluateConfig
    p = sub.add_parser("evaluate", help="identity / CLIP-T / coupling metrics of an adapter, or --compare A B")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print metric deltas of two evaluation folders "
                   "(refused when their prompts, seeds or identities differ, unless --force)")
    p.add_argument("--force", action="store_true", help="with --compare: compute deltas even across different "
                   "prompts / seeds / identities")
    _from_config(p, E, "--adapter", "adapter")
    _from_config(p, E, "--faces", "faces")
    _from_config(p, E, "--prompts", "prompts")
    _from_config(p, E, "--scales", "scales", type=_floats, help="comma-separated adapter scales, e.g. 0.3,0.6,1.0")
    _from_config(p, E, "--seeds", "seeds", type=_ints, help="comma-separated seeds, e.g. 0,1")
    for flag, name, tp in (("--steps", "steps", int), ("--batch-size", "batch_size", int),
                           ("--guidance", "guidance", float), ("--negative-prompt", "negative_prompt", str),
                           ("--pretrained", "pretrained", str), ("--resolution", "resolution", int),
                           ("--id-model", "id_model", str), ("--id-model-root", "id_model_root", str),
                           ("--id-model-name", "id_model_name", str), ("--clip-model", "clip_model", str),
                           ("--shards", "shards", str), ("--coupling-samples", "coupling_samples", int),
                           ("--coupling-timesteps", "coupling_timesteps", int), ("--superclass", "superclass", str),
                           ("--text-projection", "text_projection", str), ("--device", "device", str),
                           ("--clip-image-encoder", "clip_image_encoder", str), ("--s-scale", "s_scale", float),
                           ("--lora-scale", "lora_scale", float)):
        _from_config(p, E, flag, name, type=tp)
    _from_config(p, E, "--out", "out", help="output folder (default outputs/evaluate); with --compare: where to "
                 "write compare.md and compare_tradeoff.png (nothing written without it)", shown=None)
    p.set_defaults(func=cmd_evaluate)

    # The trainers keep their own command lines (accord_face/train/cli.py, accord_face/lora/cli.py); main()
    # hands them everything after the command name. Listed here for --help.
    for name, what in TRAINERS.items():
        sub.add_parser(name, help=what[1], add_help=False)

    p = sub.add_parser("export", help="write an exported adapter or LoRA in another tool's layout "
                       "(ComfyUI_IPAdapter_plus / tencent IP-Adapter, kohya / A1111)")
    p.add_argument("--adapter", help="identity adapter folder (OUTPUT/adapter) -> --format comfyui")
    p.add_argument("--lora", help="LoRA folder (OUTPUT/lora) -> --format kohya (= comfyui)")
    p.add_argument("--format", required=True, choices=["comfyui", "kohya"], help="target layout")
    p.add_argument("--lora-rank", type=int, default=128, help="rank of the (zero) FaceID LoRA keys written into "
                   "a 4-token comfyui file when no identity LoRA was trained (a trained one keeps its rank); "
                   "tencent's IPAdapterFaceID(lora_rank=...) must match")
    p.add_argument("--out", help="output file (default: beside the diffusers file in the same folder)")
    p.set_defaults(func=cmd_export)

    # Shard preparation: the same flags as scripts/prepare_shards.py (generated from PrepareConfig).
    from data_pipelines.prepare_shards import build_parser as _shard_parser

    p = _shard_parser(sub.add_parser("prepare-shards", help="photos + captions -> WebDataset shards with faces "
                                     "and identity embeddings"))
    p.set_defaults(func=cmd_prepare_shards, _parser=p)
    for child in sub.choices.values():
        if "--verbose" not in child._option_string_actions:
            child.add_argument("--verbose", action="store_true", help="show third-party warnings and model-loading "
                               "progress bars (hidden by default; accord_face/quiet.py lists them)")
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from . import checks
    from .export_formats import ExportError, adapter_format_note, export_adapter_as, export_lora_as

    try:
        if bool(args.adapter) == bool(args.lora):
            raise checks.UsageError("give exactly one of --adapter DIR (identity adapter) or --lora DIR (LoRA)")
        if args.adapter:
            folder = checks.check_adapter_dir(args.adapter)
            if args.format != "comfyui":
                raise checks.UsageError(f"--format {args.format} is a LoRA layout; an identity adapter exports as "
                                        "--format comfyui")
            path = export_adapter_as(folder, "comfyui", args.out, lora_rank=args.lora_rank)
        else:
            path = export_lora_as(checks.check_lora_dir(args.lora), args.format, args.out)
    except (checks.UsageError, ExportError) as err:
        if args.adapter and isinstance(err, ExportError) and Path(args.adapter).is_dir():
            err = ExportError(f"{err}. {adapter_format_note(args.adapter)}")
        return _user_error("export", err)
    print(f"[export] {path}")
    if args.adapter and (Path(args.adapter) / "pytorch_lora_weights.safetensors").is_file():
        from .export_formats import comfyui_names

        lora = path.parent / comfyui_names(False, "sdxl" in path.name)[1]
        print(f"[export] {lora} (identity LoRA: ComfyUI/models/loras; {path.name}: ComfyUI/models/ipadapter)")
    return 0


def cmd_prepare_shards(args: argparse.Namespace) -> int:
    import logging

    from data_pipelines.prepare_shards import run

    from .quiet import setup_logging

    setup_logging(logging.INFO)
    return run(args, args._parser)


TRAINERS = {
    "train-encoder": ("accord_face.train.cli", "train an identity encoder with ACCORD under DeepSpeed "
                      "(accord-face train-encoder --help; = scripts/train_encoder.py)"),
    "train-lora": ("accord_face.lora.cli", "train a subject / style LoRA with ACCORD "
                   "(accord-face train-lora --help; = scripts/train_lora.py)"),
}


def main(argv: list[str] | None = None) -> int:
    from .quiet import quiet_third_party

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAINERS:
        import importlib

        sys.argv[0] = f"accord-face {argv[0]}"   # the trainer's argparse names itself after argv[0]
        return importlib.import_module(TRAINERS[argv[0]][0]).main(argv[1:])
    _offline_defaults()
    quiet_third_party(verbose="--verbose" in argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
