"""How good is the world's base pipeline? Judged on generated images, no adapter.

- prompt following: for random grammar prompts, how often the judge finds each asked-for
  context attribute (and all of them), next to the judge's accuracy on clean renders;
- identity variety: the spread of the judge's person attributes (skin, hair colour, hair style,
  facial hair) over unconditioned draws, as normalised entropy (1 = uniform over the classes)
  and next to the same figure for renders of the training identities.

``python -m accord_face.world.report --out docs/world`` writes ``base_report.json`` and
``base_samples.png`` (prompts in rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def _entropy(labels: np.ndarray, classes: int) -> float:
    p = np.bincount(labels, minlength=classes) / max(len(labels), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(classes))


def base_model_report(n_prompts: int = 48, per_prompt: int = 2, steps: int = 25, guidance: float = 4.0,
                      seed: int = 0, out: Path | None = None) -> dict:
    from diffusers import StableDiffusionPipeline

    from .assemble import ensure_world_pipeline, load_judge
    from .judge import HEADS, IDENTITY_FIELDS, identity_codes, predict
    from .pool import CONTEXT_FIELDS, encode_context
    from .render import caption, random_context, render

    folder = ensure_world_pipeline()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(folder)
    rng = np.random.default_rng(seed)
    ctxs = [random_context(rng) for _ in range(n_prompts)]
    images, asked = [], []
    from tqdm.auto import tqdm

    for k in tqdm(range(0, n_prompts, 8), desc="base model samples"):
        chunk = ctxs[k:k + 8]
        prompts = [caption(c) for c in chunk for _ in range(per_prompt)]
        gens = [torch.Generator().manual_seed(seed * 100_000 + k * per_prompt + i) for i in range(len(prompts))]
        out_imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                        generator=gens).images
        images += [np.asarray(im) for im in out_imgs]
        asked += [encode_context(c) for c in chunk for _ in range(per_prompt)]
    images, asked = np.stack(images), np.stack(asked)
    probs = predict(judge, images)
    seen = np.stack([probs[f].argmax(1) for f in CONTEXT_FIELDS], axis=1)
    following = {f: float((seen[:, j] == asked[:, j]).mean()) for j, f in enumerate(CONTEXT_FIELDS)}
    following["all"] = float((seen == asked).all(1).mean())
    renders = [render(int(rng.integers(2000)), random_context(rng), int(rng.integers(1 << 20))) for _ in range(400)]
    r_codes = np.stack([identity_codes(p.identity.index) for p in renders])
    variety = {f: {"generated": _entropy(probs[f].argmax(1), HEADS[f]),
                   "renders": _entropy(r_codes[:, j], HEADS[f])} for j, f in enumerate(IDENTITY_FIELDS)}
    report = {"images": int(len(images)), "prompts": n_prompts, "steps": steps, "guidance": guidance,
              "prompt_following": following, "identity_variety_normalised_entropy": variety,
              "judge": "accord_face.world.judge (held-out render accuracy in assets/world.json)"}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "base_report.json").write_text(json.dumps(report, indent=2) + "\n")
        from PIL import Image

        rows = [np.concatenate(list(images[i * 8:(i + 1) * 8]), axis=1) for i in range(min(6, len(images) // 8))]
        Image.fromarray(np.concatenate(rows, axis=0)).resize((8 * 128, len(rows) * 128), Image.NEAREST).save(
            out / "base_samples.png")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accord_face.world.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/world", help="output folder")
    parser.add_argument("--prompts", type=int, default=48, help="random grammar prompts")
    parser.add_argument("--per-prompt", type=int, default=2, help="images per prompt")
    args = parser.parse_args(argv)
    report = base_model_report(args.prompts, args.per_prompt, out=Path(args.out))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
