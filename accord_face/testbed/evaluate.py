"""The evaluation protocol (fixed before any arm was run) and its statistics.

Per fine-tuned model and reference set with context object C:
  target prompts   "a sks on a {bg} background" (4) and
                   "a sks and a {colour} {other} on a {bg} background" for the two
                   base shapes other than C (8); C is never asked for.
  context prompts  "a {C colour} {C} on a {bg} background" (4): the check that the
                   context prompt alone still works (a collapse of text conditioning shows here).
Measured by the judge on every generated image:
  target_fidelity  the target (X) is present
  coupling_rate    C is present although not asked for
  text_alignment   mean over the asked-for non-target items (background right, other shape present)
  context_alone    on context prompts: C present and background right
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from accord_face.testbed.judge import Judge, predict
from accord_face.testbed.model import T2I, sample
from accord_face.testbed.world import BASE_SHAPES, BG_NAMES, OBJECT_COLOURS, SHAPES, TARGET_SHAPE, TARGET_TOKEN, caption

METRICS = ("target_fidelity", "coupling_rate", "text_alignment", "context_alone", "context_target_leak")


def target_prompts(context: tuple[str, str]) -> list[tuple[str, str, str | None]]:
    """(prompt, background, other shape or None) for the target prompts of a context."""
    others = [s for s in BASE_SHAPES if s != context[0]]
    colours = [c for c in OBJECT_COLOURS if c != context[1]]
    out = [(caption([f"a {TARGET_TOKEN}"], bg), bg, None) for bg in BG_NAMES]
    for i, bg in enumerate(BG_NAMES):
        for j, other in enumerate(others):
            col = colours[(i + j) % len(colours)]
            out.append((caption([f"a {TARGET_TOKEN}", f"a {col} {other}"], bg), bg, other))
    return out


def context_prompts(context: tuple[str, str]) -> list[tuple[str, str]]:
    return [(caption([f"a {context[1]} {context[0]}"], bg), bg) for bg in BG_NAMES]


def score_target_images(present: torch.Tensor, bg_pred: torch.Tensor, specs, context_shape: str) -> dict[str, list[float]]:
    """Per-image indicators for target prompts. present (N, S) bool, bg_pred (N,), specs per image."""
    ti, ci = SHAPES.index(TARGET_SHAPE), SHAPES.index(context_shape)
    fid, cpl, ali = [], [], []
    for k, (_, bg, other) in enumerate(specs):
        fid.append(float(present[k, ti]))
        cpl.append(float(present[k, ci]))
        items = [float(int(bg_pred[k]) == BG_NAMES.index(bg))]
        if other is not None:
            items.append(float(present[k, SHAPES.index(other)]))
        ali.append(float(np.mean(items)))
    return {"target_fidelity": fid, "coupling_rate": cpl, "text_alignment": ali}


def protocol_specs(context: tuple[str, str], images_per_prompt: int):
    """(target specs, context specs), one entry per generated image, in generation order."""
    specs = [s for s in target_prompts(context) for _ in range(images_per_prompt)]
    cspecs = [s for s in context_prompts(context) for _ in range(images_per_prompt)]
    return specs, cspecs


@torch.no_grad()
def score_images(images: torch.Tensor, judge: Judge, context: tuple[str, str], images_per_prompt: int,
                 threshold: float = 0.5) -> tuple[dict[str, float], dict]:
    """Judge the protocol's images (target prompts first, then context prompts) -> (metric means, raw)."""
    specs, cspecs = protocol_specs(context, images_per_prompt)
    if images.shape[0] != len(specs) + len(cspecs):
        raise ValueError(f"expected {len(specs) + len(cspecs)} protocol images, got {images.shape[0]}")
    present, bg = predict(judge, images, threshold)
    n = len(specs)
    per = score_target_images(present[:n], bg[:n], specs, context[0])
    ci, ti = SHAPES.index(context[0]), SHAPES.index(TARGET_SHAPE)
    per["context_alone"] = [float(present[n + k, ci] and int(bg[n + k]) == BG_NAMES.index(b))
                            for k, (_, b) in enumerate(cspecs)]
    per["context_target_leak"] = [float(present[n + k, ti]) for k in range(len(cspecs))]
    means = {k: float(np.mean(v)) for k, v in per.items()}
    return means, {"prompts": [s[0] for s in specs + cspecs], "images": images, "present": present, "bg": bg,
                   "n_target": n}


@torch.no_grad()
def evaluate_model(model: T2I, judge: Judge, context: tuple[str, str], seed: int, images_per_prompt: int,
                   steps: int, guidance: float, threshold: float = 0.5) -> tuple[dict[str, float], dict]:
    """Generate the protocol's images with ``seed`` and judge them -> (metric means, raw images/labels)."""
    specs, cspecs = protocol_specs(context, images_per_prompt)
    images = sample(model, [s[0] for s in specs + cspecs], seed=seed, steps=steps, guidance=guidance)  # eta = 1
    return score_images(images, judge, context, images_per_prompt, threshold)


@torch.no_grad()
def prompt_accuracy(model: T2I, judge: Judge, n: int, seed: int, steps: int, guidance: float,
                    threshold: float = 0.5) -> dict[str, float]:
    """Base-model prompt following on random grammar prompts (0-2 base shapes), judged."""
    from accord_face.testbed.world import random_scene, scene_caption
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, min_objects=1 + i % 2, max_objects=1 + i % 2) for i in range(n)]
    images = sample(model, [scene_caption(s) for s in scenes], seed=seed, steps=steps, guidance=guidance)
    present, bg = predict(judge, images, threshold)
    asked = torch.from_numpy(np.stack([s.labels()[:-1] for s in scenes])) > 0.5
    want_bg = torch.tensor([BG_NAMES.index(s.background) for s in scenes])
    obj_recall = float((present & asked).sum() / asked.sum())
    extra = float((present & ~asked).sum() / (~asked).sum())
    bg_ok = bg == want_bg
    exact = ((present == asked).all(dim=1) & bg_ok).float().mean()
    return {"object_recall": obj_recall, "unasked_object_rate": extra, "background": float(bg_ok.float().mean()),
            "all_exact": float(exact), "n": n}


def summarize(values: list[float]) -> dict:
    """{mean, ci95, n, per_run}: Student-t 95 % half-width over runs (n = runs)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    half = float(stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": half, "n": n, "per_run": [round(float(x), 4) for x in v]}
