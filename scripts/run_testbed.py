"""Run the ACCORD coupling testbed: ``python scripts/run_testbed.py [--config configs/testbed.yaml] [key=value ...]``.

Protocol v2. Writes testbed_out/results.json, table.md and coupling_vs_fidelity.png;
reuses the cached base model, judge, strength choice, calibration and finished runs.
``--export-assets`` (re)writes the committed base model and judge.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from accord_face.config import ConfigError, load_config
from accord_face.testbed.config import TestbedConfig
from accord_face.testbed.run import export_assets, run_testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/testbed.yaml", help="YAML config (TestbedConfig)")
    parser.add_argument("--export-assets", action="store_true",
                        help="train (or load) the base model and judge, copy them to accord_face/testbed/assets, stop")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1,2]")
    args = parser.parse_args()
    try:
        cfg = load_config(TestbedConfig, args.config, args.overrides)
    except (ConfigError, OSError) as err:
        print(f"run_testbed: {err}", file=sys.stderr)
        sys.exit(2)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(Path(cfg.out_dir) / "testbed.log")])
    if args.export_assets:
        for path in export_assets(cfg, config_path=args.config):
            print(f"wrote {path}")
        return
    try:
        results = run_testbed(cfg)
    except ConfigError as err:
        print(f"run_testbed: {err}", file=sys.stderr)
        sys.exit(2)
    if results.get("prepared"):
        print("prepared: base model, judge, strength choice and calibration are cached")
        return
    print((Path(cfg.out_dir) / "table.md").read_text())
    print(f"results: {Path(cfg.out_dir) / 'results.json'} ({len(results['arms'])} arms)")


if __name__ == "__main__":
    main()
