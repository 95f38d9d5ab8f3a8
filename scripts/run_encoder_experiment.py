"""The encoder coupling experiment: ``python scripts/run_encoder_experiment.py [key=value ...]``.

Trains the main job (deepspeed scripts/train_encoder.py, FaceID-Plus on embedded:faces) per arm and
seed, evaluates each run on 50 held-out identities at 4 adapter scales, and writes
testbed_out/encoder/results.json, results.md and curves.png. Finished runs are reused, so it resumes
where it stopped. Example: ``arms=[baseline,dd_r0.3] seeds=[0,1]`` (the pilot); ``analyze_only=true``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from accord_face.config import ConfigError, load_config
from accord_face.world.experiment import ExperimentConfig, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (ExperimentConfig); default: built-in")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. arms=[baseline,dd_r0.3] seeds=[0,1]")
    args = parser.parse_args()
    try:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
    except (ConfigError, OSError) as err:
        print(f"run_encoder_experiment: {err}", file=sys.stderr)
        sys.exit(2)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "experiment.log")])
    try:
        results = run_experiment(cfg)
    except ValueError as err:
        print(f"run_encoder_experiment: {err}", file=sys.stderr)
        sys.exit(2)
    from accord_face.world.experiment import write_outputs

    print(write_outputs(cfg, results))


if __name__ == "__main__":
    main()
