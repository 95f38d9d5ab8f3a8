"""A crafted pickle that would run code when unpickled: it creates ``marker`` (the tests check it never appears)."""

from __future__ import annotations

import os
from pathlib import Path


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_torch_payload(path: Path, marker: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": Payload(marker)}, path)
    return path


def pickle_bytes(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(Payload(marker))
