#!/usr/bin/env python
"""Train a subject / style LoRA with ACCORD (the code: ``accord_face/lora/cli.py`` = ``accord-face train-lora``).

    python scripts/train_lora.py --config configs/lora_tiny.yaml output_dir=outputs/lora max_steps=4
    accelerate launch scripts/train_lora.py --config configs/lora_subject.yaml data.reference_dir=my_refs

Overrides are ``key.sub=value`` (YAML values) or diffusers-style flags (``--output_dir X``);
``--describe`` lists every key.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # a checkout without `pip install -e .`

from accord_face.lora.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
