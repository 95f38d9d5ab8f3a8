"""The VAE posterior of each distinct training image, kept in memory so that its encode runs once per run.

The trainer samples ``x0 = (mu + sigma * z) * scaling_factor`` with a per-sample generator ``z`` every step
(``step.prepare_batch``); only ``(mu, sigma) = VAE.encode(pixels)`` is deterministic, so only it is cached and
the per-step draw is unchanged: a run with the cache sees the same latent distribution and the same random
draws as one without it (equal up to the last bits that a conv's batch composition moves). The key is a hash
of the image as loaded (so an augmented variant, e.g. ``data.random_flip``, is another entry, and two shards
with the same sample key cannot collide). Per rank, bounded by ``data.latent_cache_mb``: past the bound,
new images are encoded every time as without the cache. Worth it where the dataset repeats within the run
(the identity world: 6,000 images, 16,000 steps of 16 = 43 passes; the VAE encode is about a fifth of a step
on CPU there).
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["LatentCache"]


class LatentCache:
    def __init__(self, max_mb: float):
        if max_mb <= 0:
            raise ValueError(f"data.latent_cache_mb must be > 0 to build a cache, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self.entries: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        """Digest of one loaded image (its dtype, shape and bytes)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{image.dtype}{tuple(image.shape)}".encode())
        h.update(image.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    @torch.no_grad()
    def posterior(self, vae: torch.nn.Module, loaded: torch.Tensor, pixels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of ``VAE.encode(pixels)``, each (B, C, h, w) in the VAE's dtype on ``pixels``' device;
        ``loaded`` (B, ...) is the batch as the loader gave it (the cache key), ``pixels`` the VAE's input.
        Only the images not in the cache are encoded (one batched call)."""
        keys = [self.key(x) for x in loaded]
        miss = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if miss:
            dist = vae.encode(pixels[miss]).latent_dist
            for j, i in enumerate(miss):
                fresh[i] = (dist.mean[j], dist.std[j])
                size = 2 * dist.mean[j].numel() * dist.mean[j].element_size()
                if keys[i] not in self.entries and self.bytes + size <= self.max_bytes:
                    self.entries[keys[i]] = (dist.mean[j].clone(), dist.std[j].clone())
                    self.bytes += size
        got = [fresh[i] if i in fresh else self.entries[k] for i, k in enumerate(keys)]
        return torch.stack([m for m, _ in got]), torch.stack([s for _, s in got])

    def summary(self) -> str:
        seen = self.hits + self.misses
        return (f"latent cache: {len(self.entries)} images, {self.bytes / 2**20:.1f} MB of "
                f"{self.max_bytes / 2**20:.0f}; hits {self.hits} of {seen} ({self.hits / max(seen, 1):.0%})")
