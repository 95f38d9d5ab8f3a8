"""Branches from the identity world's plateau: ``python scripts/run_world_capacity.py [key=value ...]``.

Each arm continues the length run's 16,000-step adapter (init_adapter) for 4,000 steps with one change
(cosine learning-rate decay, an identity LoRA on the UNet) and is evaluated on the same 50 held-out
people; summary.json / summary.png go to testbed_out/world_capacity and docs/world/capacity
(accord_face/world/capacity.py). Resumable: finished arms are kept. Example: ``arms=[cosine] port=29931``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from accord_face.config import ConfigError, load_config
from accord_face.world.capacity import CapacityConfig, run_capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (CapacityConfig); default: built-in")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. arms=[cosine] port=29931")
    args = parser.parse_args()
    try:
        cfg = load_config(CapacityConfig, args.config, args.overrides)
        cfg.validate()
    except (ConfigError, OSError, ValueError) as err:
        print(f"run_world_capacity: {err}", file=sys.stderr)
        sys.exit(2)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(Path(cfg.out) / "capacity.log")])
    result = run_capacity(cfg)
    print(json.dumps({a: {k: r[k]["mean"] for k in ("identity_similarity", "retrieval_top1", "context_accuracy")}
                      for a, r in result["arms"].items()}, indent=1))
    if result["pending"]:
        print(f"pending arms: {result['pending']} (rerun the same command to continue)")


if __name__ == "__main__":
    main()
