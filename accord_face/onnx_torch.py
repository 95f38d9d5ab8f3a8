"""Run a small ONNX graph as a differentiable torch module (frozen weights).

Why: a recognizer shipped as ONNX (the world's ``recognizer_a.onnx``, insightface's
``w600k_r50.onnx``, OpenCV's SFace) gives embeddings on onnxruntime, but an identity loss
on generated pixels needs its gradient. ``OnnxModule`` interprets the graph node by node
with torch ops, so gradients flow to the input; its initializers are buffers (never
trained). Only the operators such CNN recognizers use are supported; any other raises
``NotImplementedError`` naming the node (no silent approximation).

Equality with onnxruntime on the same input is tested (``tests/test_identity_loss.py``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OnnxModule", "SUPPORTED"]


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs: dict, nd: int = 2) -> list[int]:
    p = list(attrs.get("pads", [0] * (2 * nd)))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise NotImplementedError(f"auto_pad={attrs['auto_pad']!r}")
    return p


def _pad_input(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """ONNX pads (begin..., end...) -> (possibly padded x, symmetric padding for torch)."""
    nd = len(pads) // 2
    begin, end = pads[:nd], pads[nd:]
    if begin == end:
        return x, begin
    # torch pads the last dim first: (w_begin, w_end, h_begin, h_end)
    flat = [v for b, e in zip(reversed(begin), reversed(end)) for v in (b, e)]
    return F.pad(x, flat, value=value), [0] * nd


def _conv(x, w, b=None, **a):
    x, pad = _pad_input(x, _pads(a))
    return F.conv2d(x, w, b, stride=a.get("strides", 1), padding=pad, dilation=a.get("dilations", 1),
                    groups=a.get("group", 1))


def _avgpool(x, **a):
    x, pad = _pad_input(x, _pads(a))
    return F.avg_pool2d(x, a["kernel_shape"], a.get("strides", a["kernel_shape"]), pad,
                        ceil_mode=bool(a.get("ceil_mode", 0)), count_include_pad=bool(a.get("count_include_pad", 0)))


def _maxpool(x, **a):
    x, pad = _pad_input(x, _pads(a), value=-float("inf"))
    return F.max_pool2d(x, a["kernel_shape"], a.get("strides", a["kernel_shape"]), pad,
                        ceil_mode=bool(a.get("ceil_mode", 0)))


def _gemm(a_, b_, c=None, **a):
    if a.get("transA", 0):
        a_ = a_.t()
    if a.get("transB", 0):
        b_ = b_.t()
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y if c is None else y + a.get("beta", 1.0) * c


def _batchnorm(x, scale, bias, mean, var, **a):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _reduce(fn):
    def run(x, axes_input=None, **a):   # axes: an attribute (opset < 18) or the second input
        dims = a.get("axes", None if axes_input is None else [int(v) for v in axes_input.tolist()])
        dims = list(range(x.ndim)) if dims is None else [int(d) for d in dims]
        return fn(x, dims, bool(a.get("keepdims", 1)))
    return run


def _clip(x, lo=None, hi=None, **a):
    lo = a.get("min", lo)
    hi = a.get("max", hi)
    return torch.clamp(x, min=lo, max=hi)


def _flatten(x, **a):
    axis = a.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(x, shape, **a):
    shape = [int(s) for s in shape.tolist()]
    shape = [x.shape[i] if s == 0 and not a.get("allowzero", 0) else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(x, starts, ends, axes=None, steps=None, **a):
    idx = [slice(None)] * x.ndim
    axes = range(len(starts)) if axes is None else axes.tolist()
    steps = [1] * len(starts) if steps is None else steps.tolist()
    for s, e, ax, st in zip(starts.tolist(), ends.tolist(), axes, steps):
        idx[int(ax)] = slice(int(s), int(min(e, 2 ** 62)), int(st))
    return x[tuple(idx)]


def _prelu(x, slope, **a):
    return torch.where(x >= 0, x, x * slope)


SUPPORTED = {
    "Conv": _conv, "Relu": lambda x, **a: F.relu(x), "PRelu": _prelu,
    "LeakyRelu": lambda x, **a: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Sigmoid": lambda x, **a: torch.sigmoid(x), "Erf": lambda x, **a: torch.erf(x),
    "Tanh": lambda x, **a: torch.tanh(x),
    "Add": lambda x, y, **a: x + y, "Sub": lambda x, y, **a: x - y, "Mul": lambda x, y, **a: x * y,
    "Div": lambda x, y, **a: x / y, "Sqrt": lambda x, **a: torch.sqrt(x), "Pow": lambda x, y, **a: x ** y,
    "AveragePool": _avgpool, "MaxPool": _maxpool,
    "GlobalAveragePool": lambda x, **a: x.mean(dim=(2, 3), keepdim=True),
    "Flatten": _flatten, "Reshape": _reshape, "Gemm": _gemm, "MatMul": lambda x, y, **a: x @ y,
    "BatchNormalization": _batchnorm,
    "ReduceL2": _reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k))),
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "Clip": _clip, "Identity": lambda x, **a: x, "Dropout": lambda x, *r, **a: x,
    "Shape": lambda x, **a: torch.tensor(list(x.shape), dtype=torch.int64),
    "Expand": lambda x, shape, **a: x.expand(torch.broadcast_shapes(x.shape, tuple(int(s) for s in shape.tolist()))),
    "Concat": lambda *xs, **a: torch.cat(xs, dim=a["axis"]),
    "Transpose": lambda x, **a: x.permute(*a.get("perm", list(range(x.ndim))[::-1])),
    "Slice": _slice, "Unsqueeze": lambda x, axes_input=None, **a: _unsqueeze(x, a.get("axes", axes_input)),
}


def _unsqueeze(x, axes):
    for ax in sorted(int(v) for v in (axes.tolist() if torch.is_tensor(axes) else axes)):
        x = x.unsqueeze(ax)
    return x


class OnnxModule(nn.Module):
    """``OnnxModule(path)(x)``: the graph's first output for its (single) input, differentiable in x.

    Weights are float32 buffers; ``requires_grad`` is never set on them."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        graph = model.graph
        self.path = str(path)
        init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_name = next(i.name for i in graph.input if i.name not in init)
        self.output_name = graph.output[0].name
        self._names: dict[str, str] = {}
        for k, (name, arr) in enumerate(init.items()):
            buf = f"w{k}"
            self._names[name] = buf
            t = torch.from_numpy(np.array(arr))
            self.register_buffer(buf, t.float() if t.is_floating_point() else t, persistent=False)
        self.nodes = []
        for node in graph.node:
            a = _attrs(node)
            if node.op_type == "Constant":
                value = a.get("value")
                arr = numpy_helper.to_array(value) if value is not None else np.array(a.get("value_float",
                                                                                                a.get("value_int")))
                buf = f"c{len(self._names)}"
                self._names[node.output[0]] = buf
                t = torch.from_numpy(np.array(arr))
                self.register_buffer(buf, t.float() if t.is_floating_point() else t, persistent=False)
                continue
            if node.op_type not in SUPPORTED:
                raise NotImplementedError(f"{path}: ONNX operator {node.op_type} (node {node.name!r}) is not supported "
                                          f"by accord_face.onnx_torch; supported: {sorted(SUPPORTED)}")
            self.nodes.append((node.op_type, list(node.input), list(node.output), a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for name, buf in self._names.items():
            env[name] = getattr(self, buf)
        for op, ins, outs, a in self.nodes:
            args = [env[i] if i else None for i in ins]
            while args and args[-1] is None:   # trailing optional inputs left out
                args.pop()
            env[outs[0]] = SUPPORTED[op](*args, **a)
        return env[self.output_name]
