#!/usr/bin/env python
"""Photos + captions -> WebDataset shards with faces and identity embeddings.

    python scripts/prepare_shards.py --input photos/ --output shards/ [--backend opencv-zoo|insightface]
        [--model-root DIR] [--workers N] [--shard-size N] [--min-face FRAC] [--resolution PX] ...

Rerunning the same command resumes an interrupted run. See README "Preparing shards".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from data_pipelines.prepare_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
