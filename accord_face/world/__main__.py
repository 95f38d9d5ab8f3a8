"""``python -m accord_face.world <command>``: the identity world's command line.

    build      train the world's models from nothing (see accord_face.world.build)
    photos     write training photos (+ metadata.jsonl) for scripts/prepare_shards.py --backend world
    evaluate   zero-shot evaluation of an adapter on held-out identities (metrics.json, grid.png)
"""

from __future__ import annotations

import argparse
import sys


def _range(text: str) -> range:
    try:
        a, _, b = text.partition(":")
        return range(int(a), int(b))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST:END, e.g. 0:1500") from None


def format_summary(m: dict) -> str:
    def ci(d):
        if d.get("mean") is None:
            return "n/a"
        lo, hi = d["ci95"] or (float("nan"), float("nan"))
        return f"{d['mean']:.3f} [{lo:.3f}, {hi:.3f}]"

    a, b = m["arms"]["adapter"], m["arms"]["base"]
    d = m["paired_adapter_minus_base"]
    lines = [f"held-out identities: {m['identities']} (retrieval chance {m['chance_top1']:.3f}); mean [95% CI]",
             f"  identity similarity   adapter {ci(a['identity_similarity'])}   no adapter {ci(b['identity_similarity'])}"
             f"   paired difference {ci(d['identity_similarity'])}",
             f"  retrieval top-1       adapter {ci(a['retrieval_top1'])}   no adapter {ci(b['retrieval_top1'])}",
             f"  context accuracy      adapter {ci(a['context_accuracy'])}   no adapter {ci(b['context_accuracy'])}"
             f"   ratio {m['context_accuracy_ratio_vs_base']:.3f}",
             f"  coupling rate         adapter {ci(a['coupling_rate'])}   no adapter {ci(b['coupling_rate'])}",
             f"  CLIP-T (world CLIP)   adapter {ci(a['clip_t'])}   no adapter {ci(b['clip_t'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "build":
        from .build import main as build_main

        return build_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m accord_face.world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="train the world's models (flags: python -m accord_face.world build --help)")
    p = sub.add_parser("photos", help="training photos of training identities, random contexts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--identities", type=_range, default=range(0, 1500), help="identity numbers FIRST:END (< 2000)")
    p.add_argument("--per-identity", type=int, default=4, help="photos per identity")
    p.add_argument("--seed", type=int, default=0, help="context and nuisance seed")
    e = sub.add_parser("evaluate", help="zero-shot evaluation on held-out identities",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    import dataclasses

    from .evaluate import WorldEvalConfig

    for f in dataclasses.fields(WorldEvalConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": f.metadata.get("help", "")}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            kwargs["type"] = type(f.default)
        e.add_argument(flag, dest=f.name, **kwargs)
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings and progress bars")
    args = parser.parse_args(argv)
    from ..quiet import quiet_third_party, setup_logging

    quiet_third_party(args.verbose)
    setup_logging(fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "photos":
        from .photos import write_training_photos

        try:
            folder = write_training_photos(args.out, args.identities, args.per_identity, seed=args.seed)
        except ValueError as err:
            parser.exit(2, f"world photos: error: {err}\n")
        print(f"world photos: {len(args.identities) * args.per_identity} in {folder}")
        return 0
    from pathlib import Path

    from .assemble import WorldMissingError
    from .evaluate import run_world_eval
    from ..pipeline import GenerateError

    cfg = WorldEvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldEvalConfig)})
    if not Path(cfg.adapter).is_dir():
        parser.exit(2, f"world evaluate: error: adapter folder {cfg.adapter} does not exist\n")
    try:
        metrics = run_world_eval(cfg)
    except (GenerateError, WorldMissingError, ValueError) as err:
        parser.exit(2, f"world evaluate: error: {err}\n")
    print(format_summary(metrics))
    print(f"metrics: {Path(cfg.out) / 'metrics.json'}; grid: {Path(cfg.out) / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
