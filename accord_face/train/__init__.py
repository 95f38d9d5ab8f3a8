"""The identity-encoder trainer under DeepSpeed (config, models, step, loop, checkpoints, validation)."""

from .config import TrainConfig, preflight

__all__ = ["TrainConfig", "preflight", "train"]


def train(cfg: TrainConfig) -> dict:
    """Run training (see loop.train); imported lazily so that configs load without DeepSpeed."""
    from .loop import train as _train

    return _train(cfg)
