"""Concept coupling built into the identity world's training data (the encoder coupling experiment).

Real face datasets photograph a person in their usual settings, and an FFHQ-style set has one
photo per person, whose own embedding conditions its own denoising. Two knobs reproduce that:

- ``rho``: the share of an identity's photos taken in its *home* context ``home_context(i)``
  (background, shirt, accessory and framing drawn once per identity); the other photos get a
  uniformly random context. Captions always name the photo's context truthfully and in full.
- ``p_omit``: captions are truthful but, like real ones, incomplete: a phrase is left out with this
  probability, so what the caption does not say can only come from the identity inputs.
- ``k``: photos per identity. With ``k = 1`` the identity inputs come from the very photo being
  denoised (``encoder.reference: self``), as in FFHQ; with ``k > 1`` the trainer may take them
  from another photo of the same person (``encoder.reference: other_photo``).

The probability that a field of the reference photo equals the target's (``n`` values, the
home context drawn uniformly) is

    P(same) = 1                                   (reference = the photo itself)
    P(same) = rho^2 + (1 - rho^2) / n             (another photo of the same person)

so ``other_photo`` at ``rho = 0`` gives the adapter nothing to gain from copying the photo
(the negative control) and ``self`` gives it everything (the setting ACCORD targets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import field
from .photos import write_training_photos
from .render import Context, _rng, random_context


@dataclass
class CouplingData:
    rho: float = field(0.0, help="share of an identity's photos in its home context (0, 0.8, 0.95)")
    k: int = field(1, help="photos per identity (1 = FFHQ-like, the identity from the photo itself)")
    p_omit: float = field(0.0, help="each caption phrase (shirt, background; accessory at half) left out with "
                                    "this probability: real captions are truthful but incomplete")
    identities: int = field(2000, help="training identities 0 .. n-1")
    seed: int = field(0, help="contexts and nuisance of the training photos")

    def validate(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"coupling data: rho {self.rho} must lie in [0, 1]")
        if self.k < 1:
            raise ValueError(f"coupling data: k {self.k} must be >= 1")

    @property
    def name(self) -> str:
        omit = f"-omit{self.p_omit:g}" if self.p_omit else ""
        return f"rho{self.rho:g}-k{self.k}{omit}-n{self.identities}-s{self.seed}"


def home_context(identity: int) -> Context:
    """The context an identity is usually photographed in (a pure function of the identity)."""
    return random_context(_rng("home", identity))


def context_fn(rho: float):
    """``write_training_photos`` hook: home context with probability ``rho``, else uniformly random."""

    def pick(identity: int, photo: int, rng: np.random.Generator) -> Context:
        return home_context(identity) if rng.random() < rho else random_context(rng)

    return pick


def same_field_probability(rho: float, n_values: int, self_reference: bool) -> float:
    """P(reference field == target field): 1 for self, rho^2 + (1 - rho^2) / n for another photo."""
    return 1.0 if self_reference else rho * rho + (1.0 - rho * rho) / n_values


def write_coupling_photos(folder: str | os.PathLike, data: CouplingData, progress: bool = True) -> Path:
    data.validate()
    return write_training_photos(folder, range(data.identities), data.k, seed=data.seed,
                                 context_fn=context_fn(data.rho), progress=progress, p_omit=data.p_omit)
