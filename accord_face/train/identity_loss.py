"""Identity loss on the predicted clean image (as PuLID and PortraitBooth add to the diffusion loss).

For a sample with kept identity at timestep t < ``id_timestep_fraction`` x T:

    x0_hat = x0(x_t, UNet output)                                 (latents; losses.predicted_original_sample)
    img    = VAE.decode(x0_hat / scaling_factor)                  (B, 3, R, R) in [-1, 1], gradient kept
    crop   = warp(img, S(landmarks of the training photo -> recognizer template))   (bilinear, differentiable)
    L_id   = mean_i (1 - cos(R(crop_i), e_i))

with R the conditioning recognizer run through ``onnx_torch.OnnxModule`` (frozen; the gradient goes
through it to the UNet output and on to the adapter), e_i the sample's stored embedding (the one the
adapter is conditioned on) and S the similarity transform the backend aligns with. The training
photo's own landmarks place the crop: the target image is that photo, so its face is where they say.

The evaluation recognizer is never this one (the world evaluates with ``world_b``), so the loss
cannot raise the measured identity score by fooling the instrument.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["IdentityLoss", "crop_theta", "identity_term", "load_identity_loss", "training_landmarks"]


def crop_theta(landmarks: np.ndarray, template: np.ndarray, image_size: int, crop_size: int) -> torch.Tensor:
    """(B, 5, 2) landmarks in image pixels -> (B, 2, 3) ``affine_grid`` matrices of the aligned crop.

    With M the similarity transform image -> crop (``face.similarity_transform``, as cv2.warpAffine
    uses it), a crop pixel c samples the image at M^-1 c. In align_corners=False normalised
    coordinates n = (2p + 1) / size - 1, i.e. p = A n + b with A = size / 2, b = (size - 1) / 2:

        theta = N_img^-1 . M^-1 . N_crop,    N_s = [[s/2, 0, (s-1)/2], [0, s/2, (s-1)/2], [0, 0, 1]]
    """
    from ..face import similarity_transform

    def n(s: int) -> np.ndarray:
        return np.array([[s / 2, 0, (s - 1) / 2], [0, s / 2, (s - 1) / 2], [0, 0, 1]], np.float64)

    out = []
    for lm in np.asarray(landmarks, np.float64).reshape(-1, 5, 2):
        m = np.vstack([similarity_transform(lm, template), [0, 0, 1]])          # image -> crop pixels
        out.append((np.linalg.inv(n(image_size)) @ np.linalg.inv(m) @ n(crop_size))[:2])
    return torch.from_numpy(np.stack(out)).float()


def training_landmarks(metas: list[dict], resolution: int) -> np.ndarray:
    """Shard json per sample -> (B, 5, 2) landmarks in the training image: the stored crop box
    (``crop_box``, square) resized to ``resolution`` px, whatever size the jpg was stored at."""
    from ..family.clip_image import landmarks_in_stored_image

    return np.stack([landmarks_in_stored_image(m, (resolution, resolution)) for m in metas])


@dataclass
class IdentityLoss:
    recognizer: torch.nn.Module       # (N, 3, S, S) in [-1, 1] -> (N, D), differentiable in its input
    template: np.ndarray              # (5, 2) landmark positions in the S px crop
    crop_size: int
    name: str

    def embed(self, images: torch.Tensor, landmarks: np.ndarray) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] + (B, 5, 2) -> (B, D) unit embeddings of the aligned crops."""
        theta = crop_theta(landmarks, self.template, images.shape[-1], self.crop_size).to(images.device)
        grid = F.affine_grid(theta, (len(images), 3, self.crop_size, self.crop_size), align_corners=False)
        crops = F.grid_sample(images.float(), grid.float(), mode="bilinear", padding_mode="border",
                              align_corners=False)                                # (B, 3, S, S)
        return F.normalize(self.recognizer(crops).float(), dim=1)

    def __call__(self, images: torch.Tensor, landmarks: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
        """Per-sample 1 - cos(R(crop), ref): (B,)."""
        return 1.0 - (self.embed(images, landmarks) * F.normalize(ref.float(), dim=1)).sum(dim=1)


def load_identity_loss(setting: str, recognizer: dict, device: torch.device) -> IdentityLoss:
    """The recognizer of ``losses.id_recognizer``: ``auto`` = the shards' own (world backend: its
    ONNX file beside the world pipeline, checked against the manifest's sha256), or a path to an
    ArcFace-template ONNX recognizer (insightface's, 112 px). Raises ValueError naming the fix."""
    from ..onnx_torch import OnnxModule

    if setting == "auto":
        if recognizer.get("backend") != "world":
            raise ValueError(f"losses.id_recognizer=auto knows the world backend's recognizers only; these shards "
                             f"were embedded by {recognizer.get('name')!r} (backend {recognizer.get('backend')!r}): "
                             "set losses.id_recognizer to that recognizer's ONNX file")
        from ..face import file_sha256
        from ..world.assemble import face_models_dir
        from ..world.backend import recognizer_file
        from ..world.face_models import RECOGNIZERS, world_template

        name = recognizer.get("model_name") or str(recognizer.get("name", "world_a")).split("_", 1)[-1]
        path = face_models_dir() / recognizer_file(name)
        want = (recognizer.get("model_files") or {}).get(path.name)
        if want and file_sha256(path) != want:
            raise ValueError(f"{path}: not the recognizer the shards were embedded with (sha256 differs from the "
                             "manifest's model_files); rebuild the shards or point losses.id_recognizer at it")
        size = RECOGNIZERS[name].crop
        template, label = world_template(size), f"world_{name}"
    else:
        path = Path(setting)
        if not path.is_file():
            raise ValueError(f"losses.id_recognizer: {path} does not exist (an ONNX recognizer, or auto)")
        from ..face import ARCFACE_TEMPLATE

        size, template, label = 112, ARCFACE_TEMPLATE, path.name
    net = OnnxModule(path).to(device).eval()
    log.info("identity loss: %s (%s, %d px crops)", label, path, size)
    return IdentityLoss(net, np.asarray(template, np.float64), int(size), label)


def identity_term(pred: torch.Tensor, sb, parts, fraction: float) -> tuple[torch.Tensor, int]:
    """(L_id over the eligible samples, their count): kept identity and t < fraction * T.

    The reference e_i is the conditioning embedding itself (Portrait: the mean of its photos')."""
    from .. import losses

    T = parts.scheduler.config.num_train_timesteps
    keep = (sb.id_kept & (sb.timesteps < fraction * T)).nonzero().flatten()
    if not len(keep):
        return pred.new_zeros((), dtype=torch.float32), 0
    x0 = losses.predicted_original_sample(parts.scheduler, sb.noisy[keep], pred[keep], sb.timesteps[keep])
    vae = parts.vae
    images = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample                  # (m, 3, R, R)
    ref = sb.id_embeds[keep]
    ref = ref.mean(dim=1) if ref.ndim == 3 else ref                                               # (m, D)
    per = parts.identity_loss(images, sb.landmarks[keep.cpu().numpy()], ref)
    return per.mean(), len(keep)
