"""Test helpers: tiny insightface-shaped ONNX models exported from torch, and photos from installed packages.

Holds no tests (named test_* only to sit with the face tests); imported by tests/test_face*.py and tests/test_shards*.py.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from accord_face.face import ARCFACE_TEMPLATE

DET_SIZE = 128  # the tiny detector's fixed input side


class TinySCRFD(torch.nn.Module):
    """SCRFD-shaped detector: 9 outputs (scores, box distances, 5-point distances for strides 8/16/32,
    2 anchors per cell) on a fixed 128x128 input. It "finds" one face, box FACE_BOX in its input frame,
    whatever the image: enough to drive insightface's real decoding, NMS and rescaling code."""

    FACE_BOX = (32.0, 24.0, 96.0, 96.0)  # x1, y1, x2, y2 in the 128x128 detector frame

    def __init__(self, size: int = DET_SIZE):
        super().__init__()
        scores, boxes, kps = [], [], []
        for stride in (8, 16, 32):
            cells = size // stride
            n = cells * cells * 2  # (cells^2 anchors) x 2
            sc, bb, kp = torch.full((n, 1), 0.01), torch.ones(n, 4), torch.zeros(n, 10)
            if stride == 32:
                idx = ((cells // 2) * cells + cells // 2) * 2  # first anchor of the centre cell
                cx = cy = float((cells // 2) * stride)
                x1, y1, x2, y2 = self.FACE_BOX
                sc[idx, 0] = 0.9
                bb[idx] = torch.tensor([cx - x1, cy - y1, x2 - cx, y2 - cy]) / stride
                pts = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float32) / 112.0
                pts = pts * torch.tensor([x2 - x1, y2 - y1]) + torch.tensor([x1, y1])
                kp[idx] = ((pts - torch.tensor([cx, cy])) / stride).reshape(-1)
            scores.append(sc), boxes.append(bb), kps.append(kp)
        for i, t in enumerate(scores + boxes + kps):
            self.register_buffer(f"out{i}", t)

    def forward(self, x):
        tiny = x.mean() * 1e-6  # keeps the input in the graph
        return tuple(getattr(self, f"out{i}") + tiny for i in range(9))


class TinyArcFace(torch.nn.Module):
    """ArcFace-shaped recognizer: (1, 3, 112, 112) -> (1, dim)."""

    def __init__(self, dim: int = 512, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8 * 14 * 14, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def export_tiny_pack(root: str | os.PathLike, name: str = "tiny_pack", dim: int = 512) -> tuple[str, TinyArcFace]:
    """Write ``root/models/name/{det_tiny,w_tiny}.onnx``; returns (folder, the torch recognizer)."""
    folder = os.path.join(root, "models", name)
    os.makedirs(folder, exist_ok=True)
    rec = TinyArcFace(dim).eval()
    torch.onnx.export(TinySCRFD().eval(), torch.zeros(1, 3, DET_SIZE, DET_SIZE), os.path.join(folder, "det_tiny.onnx"),
                      input_names=["input.1"], output_names=[f"o{i}" for i in range(9)], dynamo=False,
                      opset_version=17)
    torch.onnx.export(rec, torch.zeros(1, 3, 112, 112), os.path.join(folder, "w_tiny.onnx"),
                      input_names=["input.1"], output_names=["fc1"], dynamo=False, opset_version=17)
    return folder, rec


def grace_hopper() -> np.ndarray:
    import matplotlib
    from PIL import Image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return np.asarray(Image.open(path).convert("RGB"))


def astronaut() -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[..., :3])


def cameraman() -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(np.repeat(skimage.data.camera()[..., None], 3, axis=2))
