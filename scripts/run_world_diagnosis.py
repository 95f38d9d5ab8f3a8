"""Where the identity world's transfer is limited: ``python scripts/run_world_diagnosis.py [key=value ...]``.

The capacity control's adapter evaluated under one change at a time (training people, guidance, denoising
steps, sampler, a longer-trained base UNet), each check archived in docs/world/diagnosis/ with a summary
(accord_face/world/diagnosis.py). Resumable: archived checks are the record. Example: ``checks=[guidance2]``.
``lora_oracle=10`` adds the per-person LoRA oracle on the first 10 held-out people (accord_face/world/oracle.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from accord_face.config import ConfigError, load_config
from accord_face.world.diagnosis import DiagnosisConfig, run_diagnosis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (DiagnosisConfig); default: built-in")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. checks=[guidance2]")
    args = parser.parse_args()
    try:
        cfg = load_config(DiagnosisConfig, args.config, args.overrides)
        cfg.validate()
    except (ConfigError, OSError, ValueError) as err:
        print(f"run_world_diagnosis: {err}", file=sys.stderr)
        sys.exit(2)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(Path(cfg.out) / "diagnosis.log")])
    s = run_diagnosis(cfg)
    print(json.dumps({c: {k: round(r[k]["mean"], 3) for k in ("identity_similarity", "retrieval_top1")}
                      for c, r in s["checks"].items()}, indent=1))
    if "lora_oracle" in s:
        o = s["lora_oracle"]
        print(json.dumps({"lora_oracle": {"people": o["people"], **{k: round(o[k]["mean"], 3) for k in
                                                                    ("identity_similarity", "retrieval_top1")}}}))
    if s["pending"]:
        print(f"pending checks: {s['pending']} (rerun the same command to continue)")


if __name__ == "__main__":
    main()
