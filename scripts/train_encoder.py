#!/usr/bin/env python
"""Train an identity encoder (IP-Adapter-FaceID style) with ACCORD under DeepSpeed.

    deepspeed scripts/train_encoder.py --config configs/tiny.yaml shards=DIR output_dir=X max_steps=30
    python scripts/train_encoder.py --config configs/tiny.yaml output_dir=out/x max_steps=4

Trailing ``key.sub=value`` arguments (or diffusers-style flags: ``--output_dir X``) override the
YAML; ``--describe`` lists every key. The code is ``accord_face/train/cli.py`` (``accord-face train-encoder``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a checkout without install

from accord_face.train.cli import main  # noqa: E402  (= accord-face train-encoder)


if __name__ == "__main__":
    sys.exit(main())
