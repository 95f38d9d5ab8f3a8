"""Identity transfer vs training length on the identity world: ``python scripts/run_world_length.py [key=value ...]``.

Continues one run of configs/faces.yaml milestone by milestone (default 4,000 / 8,000 / 12,000 / 16,000 /
24,000 / 32,000 steps), evaluates each milestone's adapter on 50 held-out people, and writes curve.json / curve.png to
testbed_out/world_length and docs/world/length (accord_face/world/length.py). Resumable: finished
milestones are kept, a killed training resumes from its checkpoint. Example: ``milestones=[4000,8000]
stop_at=17:30``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from accord_face.config import ConfigError, load_config
from accord_face.world.length import LengthConfig, run_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (LengthConfig); default: built-in")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. milestones=[4000,8000]")
    args = parser.parse_args()
    try:
        cfg = load_config(LengthConfig, args.config, args.overrides)
        cfg.validate()
    except (ConfigError, OSError, ValueError) as err:
        print(f"run_world_length: {err}", file=sys.stderr)
        sys.exit(2)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(Path(cfg.out) / "length.log")])
    result = run_length(cfg)
    print(json.dumps({s: {k: v["mean"] for k, v in m.items() if isinstance(v, dict) and "mean" in v}
                      for s, m in result["milestones"].items()}, indent=1))
    if result["pending"]:
        print(f"pending milestones: {result['pending']} (rerun the same command to continue)")


if __name__ == "__main__":
    main()
