"""The evaluation protocol (v2, fixed before any arm was run) and its scores.

Per fine-tuned model and reference set with context object C:
  target prompts     "a sks cross on a {bg} background" (4) and
                     "a sks cross and a {colour} {other} on a {bg} background" for the two
                     context shapes other than C (8); C is never asked for.
  context prompts    "a {C colour} {C} on a {bg} background" (4): the check that the
                     context prompt alone still works (a collapse of text conditioning shows here).
  unrelated prompts  16 fixed grammar prompts (1-2 base shapes, crosses included, never the target),
                     2 images each: how much of the base model's text alignment is kept.
Measured by the judge on every generated image, thresholded (rates) and as probabilities (``*_p``):
  target_fidelity      the target (sks = orange cross) is present
  coupling_rate        C is present although not asked for
  text_alignment       mean over the asked-for non-target items (background right, other shape present)
  unrelated_alignment  the same on the unrelated prompts
  context_alone        on context prompts: C present and background right
  context_target_leak  on context prompts: the target is present
"""

from __future__ import annotations

import numpy as np
import torch

from accord_face.testbed.judge import Judge, probabilities
from accord_face.testbed.model import T2I, sample
from accord_face.testbed.stats import summarize  # noqa: F401  (re-exported: tests and callers use it from here)
from accord_face.testbed.world import (BG_NAMES, CONTEXT_SHAPES, LABELS, OBJECT_COLOURS, TARGET_PHRASE, TARGET_TOKEN,
                                       caption, random_scene, scene_caption)

RATES = ("target_fidelity", "coupling_rate", "text_alignment", "unrelated_alignment", "context_alone",
         "context_target_leak")
METRICS = RATES + tuple(f"{m}_p" for m in RATES)
UNRELATED_IMAGES = 2


def target_prompts(context: tuple[str, str]) -> list[tuple[str, str, str | None]]:
    """(prompt, background, other shape or None) for the target prompts of a context."""
    others = [s for s in CONTEXT_SHAPES if s != context[0]]
    colours = [c for c in OBJECT_COLOURS if c != context[1]]
    out = [(caption([TARGET_PHRASE], bg), bg, None) for bg in BG_NAMES]
    for i, bg in enumerate(BG_NAMES):
        for j, other in enumerate(others):
            col = colours[(i + j) % len(colours)]
            out.append((caption([TARGET_PHRASE, f"a {col} {other}"], bg), bg, other))
    return out


def context_prompts(context: tuple[str, str]) -> list[tuple[str, str]]:
    return [(caption([f"a {context[1]} {context[0]}"], bg), bg) for bg in BG_NAMES]


def unrelated_prompts(n: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """(prompt, background, asked shapes): n fixed prompts of 1-2 base shapes, never the target."""
    rng = np.random.default_rng(4242)
    out = []
    for i in range(n):
        s = random_scene(rng, min_objects=1 + i % 2, max_objects=1 + i % 2)
        out.append((scene_caption(s), s.background, tuple(o.shape for o in s.objects)))
    return out


def protocol_prompts(context: tuple[str, str], images_per_prompt: int, n_unrelated: int) -> dict[str, list]:
    """Specs per generated image, in generation order: target, context, unrelated."""
    return {"target": [s for s in target_prompts(context) for _ in range(images_per_prompt)],
            "context": [s for s in context_prompts(context) for _ in range(images_per_prompt)],
            "unrelated": [s for s in unrelated_prompts(n_unrelated) for _ in range(UNRELATED_IMAGES)]}


def score_probabilities(p: torch.Tensor, pbg: torch.Tensor, specs: dict[str, list], context_shape: str,
                        threshold: float = 0.5) -> dict[str, list[float]]:
    """Per-image scores from judge probabilities p (N, len(LABELS)) and background probabilities pbg (N, BG),
    rows in protocol order. Rates threshold p at ``threshold`` and take the arg-max background; the
    ``*_p`` scores use the probabilities themselves (probability of the right background)."""
    ti, ci = LABELS.index(TARGET_TOKEN), LABELS.index(context_shape)
    nt, nc = len(specs["target"]), len(specs["context"])
    per: dict[str, list[float]] = {m: [] for m in METRICS}

    def add(name: str, hard: float, soft: float) -> None:
        per[name].append(float(hard))
        per[f"{name}_p"].append(float(soft))

    def items(k: int, bg: str, shapes) -> tuple[float, float]:
        b = BG_NAMES.index(bg)
        hard = [float(int(pbg[k].argmax()) == b)] + [float(p[k, LABELS.index(s)] > threshold) for s in shapes]
        soft = [float(pbg[k, b])] + [float(p[k, LABELS.index(s)]) for s in shapes]
        return float(np.mean(hard)), float(np.mean(soft))

    for k, (_, bg, other) in enumerate(specs["target"]):
        add("target_fidelity", p[k, ti] > threshold, p[k, ti])
        add("coupling_rate", p[k, ci] > threshold, p[k, ci])
        add("text_alignment", *items(k, bg, [other] if other else []))
    for j, (_, bg) in enumerate(specs["context"]):
        k, b = nt + j, BG_NAMES.index(bg)
        add("context_alone", (p[k, ci] > threshold) and int(pbg[k].argmax()) == b, p[k, ci] * pbg[k, b])
        add("context_target_leak", p[k, ti] > threshold, p[k, ti])
    for j, (_, bg, shapes) in enumerate(specs["unrelated"]):
        add("unrelated_alignment", *items(nt + nc + j, bg, shapes))
    return per


@torch.no_grad()
def score_images(images: torch.Tensor, judge: Judge, context: tuple[str, str], images_per_prompt: int,
                 n_unrelated: int, threshold: float = 0.5) -> tuple[dict[str, float], dict]:
    """Judge the protocol's images (target, context, unrelated prompts) -> (metric means, raw)."""
    specs = protocol_prompts(context, images_per_prompt, n_unrelated)
    n = sum(len(v) for v in specs.values())
    if images.shape[0] != n:
        raise ValueError(f"expected {n} protocol images, got {images.shape[0]}")
    p, pbg = probabilities(judge, images)
    per = score_probabilities(p, pbg, specs, context[0], threshold)
    means = {k: float(np.mean(v)) for k, v in per.items()}
    prompts = [s[0] for part in specs.values() for s in part]
    return means, {"prompts": prompts, "images": images, "present": p > threshold, "bg": pbg.argmax(dim=1),
                   "n_target": len(specs["target"])}


@torch.no_grad()
def evaluate_model(model: T2I, judge: Judge, context: tuple[str, str], seed: int, images_per_prompt: int,
                   n_unrelated: int, steps: int, guidance: float, threshold: float = 0.5) -> tuple[dict[str, float], dict]:
    """Generate the protocol's images with ``seed`` and judge them -> (metric means, raw images/labels)."""
    specs = protocol_prompts(context, images_per_prompt, n_unrelated)
    prompts = [s[0] for part in specs.values() for s in part]
    images = sample(model, prompts, seed=seed, steps=steps, guidance=guidance)  # eta = 1
    return score_images(images, judge, context, images_per_prompt, n_unrelated, threshold)


@torch.no_grad()
def prompt_accuracy(model: T2I, judge: Judge, n: int, seed: int, steps: int, guidance: float,
                    threshold: float = 0.5) -> dict[str, float]:
    """Base-model prompt following on random grammar prompts (1-2 base shapes, full captions), judged."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, min_objects=1 + i % 2, max_objects=1 + i % 2) for i in range(n)]
    images = sample(model, [scene_caption(s) for s in scenes], seed=seed, steps=steps, guidance=guidance)
    p, pbg = probabilities(judge, images)
    present = p[:, :len(LABELS) - 1] > threshold                    # base shapes only
    asked = torch.from_numpy(np.stack([s.labels()[:len(LABELS) - 1] for s in scenes])) > 0.5
    want_bg = torch.tensor([BG_NAMES.index(s.background) for s in scenes])
    bg_ok = pbg.argmax(dim=1) == want_bg
    exact = ((present == asked).all(dim=1) & bg_ok).float().mean()
    return {"object_recall": float((present & asked).sum() / asked.sum()),
            "unasked_object_rate": float((present & ~asked).sum() / (~asked).sum()),
            "background": float(bg_ok.float().mean()), "all_exact": float(exact),
            "sks_drawn": float((p[:, LABELS.index(TARGET_TOKEN)] > threshold).float().mean()), "n": n}
