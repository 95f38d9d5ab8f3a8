"""Run the ACCORD coupling testbed: ``python scripts/run_testbed.py [--config configs/testbed.yaml] [key=value ...]``.

Writes testbed_out/results.json, table.md and coupling_vs_fidelity.png; reuses
the cached base model, judge and finished runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from accord_face.config import load_config
from accord_face.testbed.config import TestbedConfig
from accord_face.testbed.run import run_testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/testbed.yaml", help="YAML config (TestbedConfig)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1,2]")
    args = parser.parse_args()
    cfg = load_config(TestbedConfig, args.config, args.overrides)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(Path(cfg.out_dir) / "testbed.log")])
    results = run_testbed(cfg)
    print((Path(cfg.out_dir) / "table.md").read_text())
    print(f"results: {Path(cfg.out_dir) / 'results.json'} ({len(results['arms'])} arms)")


if __name__ == "__main__":
    main()
