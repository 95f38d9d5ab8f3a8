"""The LoRA oracle: how much of one specific person can this generator draw when trained on that person?

    python scripts/run_world_diagnosis.py checks=[] lora_oracle=20

The diagnosis check ``lora_oracle`` (exploratory, after the capacity and diagnosis results). The adapter is
zero-shot: one embedding of one photo must tell the UNet who to draw. Here the UNet is instead fitted to each
person (DreamBooth-style), which bounds from above what this base UNet can draw of a particular person's face.
For each of the first N (``lora_oracle``) of the 50 held-out people of the evaluation (the people, references,
prompts and noise of ``EvalPlan.make(folder, 50, 2, seed=0, first=2000)``, i.e. those of
``docs/world/capacity/constant.json``):

1. ``photos`` clean renders of the person in random contexts (photo seeds 80,000 + k; the reference uses
   50,000, the render ceiling 60,000 + ..., ``photos4`` 70,000 + ...), captioned with the world grammar with
   the subject phrase ``sks person`` in place of ``a person`` (``subject_caption``: "a photo of sks person
   wearing a red shirt on a blue background"). ``sks`` is one token of the world tokenizer that no training
   caption ever used (an untrained, rare token: DreamBooth's identifier), so no learned token is needed;
2. a subject LoRA on the world pipeline's UNet with the project's LoRA trainer (``accord_face.lora``:
   plain DreamBooth-LoRA, no ACCORD, no prior preservation, no flips or crops: the renders already jitter);
3. the person's evaluation jobs generated with the LoRA (the same prompts naming context B with ``sks
   person`` swapped in, the same noise seeds, guidance 4, 25 DDPM steps, as ``generate_records`` does for the
   adapter arm) and scored with ``WorldScorer`` exactly as the adapter is: recognizer ``world_b`` against the
   full 50-reference gallery (retrieval top-1), cosine to the reference (identity similarity), the judge's
   context accuracy; CLIP-T against the plain caption (the world CLIP never saw ``sks``).

Recipe (``OracleRecipe``; fixed on the training-person check below, before any held-out person ran): 8 photos,
LoRA rank 32 (alpha 32) on every conv and linear layer of the UNet (``EVERY_LAYER``: 2.0 M LoRA weights on the
5.2 M-parameter UNet), AdamW lr 1e-3 constant (weight decay 0.01, clip 1), 1,200 steps of batch 4 (600 passes
over the 8 photos), seed 0, one torch thread: about 3.5 minutes per person. The check: one TRAINING person
(identity 7, ``check_identity``; gallery: the 50 training people 0-49 of the ``training_people`` check), the
recipe learns if its retrieval reaches that person's clean-render ceiling (0.5 for identity 7: one of the two
clean renders in context B is retrieved, identity similarity 0.896). Only the LoRA's size and length were
changed on that check, never on held-out results:

    attention only (to_q/k/v/out, 0.40 M), 400 steps      retrieval 0/2, identity similarity 0.42
    attention only, 1,200 steps                            retrieval 0/2, identity similarity 0.55
    every layer (2.0 M), 1,200 steps  (the recipe)         retrieval 1/2 (= its ceiling), similarity 0.79

(the world UNet's first level, 16 x 16 latents, has no attention: an attention-only LoRA cannot reach it; in
the images the attention-only LoRA drew blurred heads with the training photos' backgrounds, the every-layer
one the person's hair, hat and skin in the asked-for context).

Reading rule (written before the held-out people ran). With r_o the oracle's retrieval top-1 over the N
people, r_a the ``constant`` adapter's on the same people, r_c the render ceiling on their jobs:

- r_o near r_c (at least the target 0.5 and the paired gain over the adapter excluding 0): the generator can
  draw these people's identity once it knows who they are, so the zero-shot adapter (how much of the person
  its conditioning conveys) is the limit;
- r_o near r_a (the paired difference to the adapter including 0): even trained on the person the generator
  draws them no better than the adapter makes it, so the generator (the base UNet) is the limit;
- in between: both. The oracle saw 8 photos of the person, the adapter one embedding of one photo: this is an
  upper bound on what the generator can draw, not a fair rival of the adapter ("the generator can draw" means:
  weights within a rank-32 LoRA of the base UNet can). N = 10 people is few: the intervals are wide and only a
  large gap reads. (Run first on 10: retrieval 0.55 [0.29, 0.81], paired vs the adapter +0.25 [-0.05, +0.55];
  then extended, same recipe, to 20 for precision: 0.53 [0.35, 0.70], paired +0.30 [+0.09, +0.51].)

Each person's result is cached under ``<out>/lora_oracle/<person>/`` (photos, LoRA run, images,
``result.json``), so a rerun continues with the next person; the archive
(``docs/world/diagnosis/lora_oracle.json``) is rewritten after every person and records how many ran.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import field
from .render import Context, caption, random_context, render

log = logging.getLogger(__name__)

SUBJECT = "sks person"
PHOTO_SEED = 80_000


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Every conv and linear layer of the world UNet but the timestep MLP: its first level (16 x 16 latents) has no
# attention, so an attention-only LoRA cannot touch the level where a face's fine features are drawn.
EVERY_LAYER = [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
               "time_emb_proj", "conv", "conv_in", "conv_out"]


@dataclass
class OracleRecipe:
    photos: int = field(8, help="training renders of the person (random contexts)")
    rank: int = field(32, help="LoRA rank (alpha = rank: scale 1)")
    targets: list[str] = field(default_factory=lambda: list(EVERY_LAYER), help="UNet modules with LoRA")
    learning_rate: float = field(1e-3, help="AdamW learning rate (constant)")
    steps: int = field(1200, help="optimizer steps")
    batch_size: int = field(4, help="images per step")
    seed: int = field(0, help="photo contexts and the trainer's seed")
    check_identity: int = field(7, help="training person the recipe is checked on first (identity < 2000)")


def subject_caption(ctx: Context) -> str:
    """The world caption of ``ctx`` with ``sks person`` for ``a person`` (the context phrases unchanged)."""
    text = caption(ctx)
    assert text.count(" of a person") == 1, text
    return text.replace(" of a person", f" of {SUBJECT}")


def write_subject_photos(folder: Path, identity: int, recipe: OracleRecipe) -> list[dict]:
    """``recipe.photos`` renders of ``identity`` with a ``metadata.jsonl`` giving each one's LoRA prompts (joint =
    the subject caption; target / context for completeness: ACCORD is off)."""
    from ..pipeline import atomic_save_image, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([recipe.seed, identity, 31])
    rows = []
    for k in range(recipe.photos):
        ctx = random_context(rng)
        name = f"photo{k:02d}.png"
        if not (folder / name).is_file():
            from PIL import Image

            atomic_save_image(Image.fromarray(render(identity, ctx, PHOTO_SEED + k).image), folder / name)
        rows.append({"file_name": name, "joint": subject_caption(ctx), "target": f"a photo of {SUBJECT}",
                     "context": caption(ctx)})
    atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def lora_config(recipe: OracleRecipe, world: Path, photos: Path, out: Path):
    """The trainer's config of one person's LoRA (plain DreamBooth-LoRA on the world pipeline)."""
    from ..sections import LoggingConfig, OptimizerConfig
    from ..lora.config import (AccordConfig, DataConfig, LoraCheckpointing, LoraConfig, LoraTrainConfig,
                               LoraValidation)

    return LoraTrainConfig(
        pretrained_model=str(world), output_dir=str(out), max_steps=recipe.steps,
        train_batch_size=recipe.batch_size, seed=recipe.seed,
        data=DataConfig(reference_dir=str(photos), center_crop=True, crop_scale=1.0, random_flip=False),
        lora=LoraConfig(rank=recipe.rank, alpha=float(recipe.rank), unet_targets=list(recipe.targets)),
        accord=AccordConfig(lambda_dd=0.0, lambda_pd=0.0),
        optimizer=OptimizerConfig(learning_rate=recipe.learning_rate),
        checkpointing=LoraCheckpointing(checkpointing_steps=100, checkpoints_total_limit=1),
        logging=LoggingConfig(logging_steps=50, report_to="none", progress=False),
        validation=LoraValidation(validation_steps=0, validation_prompts=[f"a photo of {SUBJECT}"],
                                  num_validation_images=2))


def run_person(plan, scorer, name: str, folder: Path, world: Path, recipe: OracleRecipe, *, steps: int = 25,
               guidance: float = 4.0) -> dict:
    """Photos, LoRA, generations and scores of one person of ``plan`` (cached: ``folder/result.json``)."""
    from ..lora.train import train_lora
    from ..pipeline import FaceIDGenerator, atomic_write_text
    from .evaluate import score_images

    done = folder / "result.json"
    if done.is_file():
        res = json.loads(done.read_text())
        if res["recipe"] != asdict(recipe):
            raise ValueError(f"{done} was made with recipe {res['recipe']}, not {asdict(recipe)}: "
                             "use another out folder")
        return res
    identity = int(plan.refs[name]["identity"])
    t0 = time.time()
    write_subject_photos(folder / "photos", identity, recipe)
    run = train_lora(lora_config(recipe, world, folder / "photos", folder / "train"), log=log.info)
    train_s = time.time() - t0
    gen = FaceIDGenerator(None, str(world), "cpu", lora=folder / "train" / "lora")
    chunk = [j for j in plan.jobs if j[0] == name]
    images = gen.generate_pairs(None, [subject_caption(b) for *_, b, _ in chunk], [s for *_, s in chunk],
                                steps=steps, guidance=guidance)
    records = score_images(plan, scorer, plan.gallery(), chunk, images, [caption(b) for *_, b, _ in chunk],
                           "oracle", 1.0, folder)
    for r, (*_, b, _) in zip(records, chunk):
        r["generated_with"] = subject_caption(b)
        r.pop("embedding_b")
    res = {"identity": identity, "name": name, "recipe": asdict(recipe), "records": records,
           "per_person": person_values(records), "final_loss": run["last"].get("loss"),
           "train_seconds": round(train_s, 1), "seconds": round(time.time() - t0, 1)}
    atomic_write_text(done, json.dumps(res, indent=1) + "\n")
    return res


def person_values(records: list[dict]) -> dict:
    """One person's means over their generations (the evaluation's per-identity unit, ``RECORD_METRICS``)."""
    from .evaluate import RECORD_METRICS, _per_identity

    name = records[0]["identity"]
    return {k: _per_identity(records, [name], f)[0] for k, f in RECORD_METRICS.items()}


KEYS = ("identity_similarity", "retrieval_top1", "context_accuracy")


def summarize(results: list[dict], reference: dict | None, ceiling: dict | None, plan_names: list[str]) -> dict:
    """Means [95 % interval] over the people done, paired differences to the reference adapter's per-identity
    values of the same people, and the render ceiling of those people."""
    from .evaluate import mean_ci

    names = [r["name"] for r in results]
    idx = [plan_names.index(n) for n in names]
    per = {k: [r["per_person"][k] for r in results] for k in (*KEYS, "clip_t", "face_found")}
    out: dict = {"people": len(results), "names": names,
                 "oracle": {k: mean_ci(v) for k, v in per.items()},
                 "per_identity": {k: [round(x, 5) for x in v] for k, v in per.items()}}
    if reference is not None:
        theirs = reference["arms"]["adapter"]["per_identity"]
        base = reference["arms"]["base"]["per_identity"]
        out["adapter_same_people"] = {k: mean_ci([theirs[k][i] for i in idx]) for k in KEYS}
        out["no_adapter_same_people"] = {k: mean_ci([base[k][i] for i in idx]) for k in KEYS}
        out["paired_oracle_minus_adapter"] = {k: mean_ci(np.array(per[k]) - np.array([theirs[k][i] for i in idx]))
                                              for k in KEYS}
    if ceiling is not None:
        out["render_ceiling_same_people"] = {k: mean_ci([ceiling[k]["per_run"][i] for i in idx])
                                             for k in ("identity_similarity", "retrieval_top1")}
    return out


def write_grid(results: list[dict], out: Path, path: Path, plan) -> Path:
    """Rows: people; columns: reference | 2 of the LoRA's training photos | the oracle's generations."""
    from PIL import Image, ImageDraw

    rows = []
    for r in results:
        folder = out / r["name"]
        row = [Image.open(plan.photo(r["name"])).convert("RGB")]
        row += [Image.open(folder / "photos" / f"photo{k:02d}.png").convert("RGB") for k in range(2)]
        row += [Image.open(folder / rec["image"]).convert("RGB") for rec in r["records"]]
        rows.append(row)
    cell = 128
    cols = max(len(x) for x in rows)
    grid = Image.new("RGB", (cols * cell, len(rows) * cell + 14), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (x * cell, y * cell))
    ImageDraw.Draw(grid).text((2, len(rows) * cell + 1), "reference | 2 LoRA training photos | LoRA oracle "
                              "(evaluation prompts, context B)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def run_oracle(out: str | Path, people: int, recipe: OracleRecipe, reference: dict | None = None,
               archive: Path | None = None, identities: int = 50, threads: int = 1,
               steps: int = 25, guidance: float = 4.0) -> dict:
    """The training-person check, then the first ``people`` held-out people; the archive after each person."""
    import torch

    from ..pipeline import atomic_write_text
    from .assemble import ensure_world_pipeline
    from .evaluate import EvalPlan, WorldScorer, render_ceiling

    torch.set_num_threads(threads)
    out = Path(out)
    world = ensure_world_pipeline()
    scorer = WorldScorer()
    plan_train = EvalPlan.make(out / "references_train", identities, 2, 0, scorer, first=0)
    check_name = f"h{recipe.check_identity:04d}"
    if check_name not in plan_train.names:
        raise ValueError(f"oracle.check_identity={recipe.check_identity} is not among the {identities} training "
                         "people of the gallery (0..49)")
    check = run_person(plan_train, scorer, check_name, out / f"check-{check_name}", world, recipe,
                       steps=steps, guidance=guidance)
    check_ceiling = render_ceiling(plan_train, scorer)
    k = plan_train.names.index(check_name)
    log.info("recipe check on training person %s: %s", check_name, check["per_person"])
    plan = EvalPlan.make(out / "references", identities, 2, 0, scorer)
    ceiling = render_ceiling(plan, scorer)
    results: list[dict] = []
    head = {"what": "per-person subject LoRA (DreamBooth-style) on the world UNet, evaluated as the adapter "
                    "(accord_face/world/oracle.py)",
            "recipe": asdict(recipe), "people_requested": people, "gallery": identities,
            "steps": steps, "guidance": guidance,
            "recipe_check": {"identity": check["identity"], **check["per_person"],
                             "final_loss": check["final_loss"], "train_seconds": check["train_seconds"],
                             "render_ceiling": {m: check_ceiling[m]["per_run"][k]
                                                for m in ("identity_similarity", "retrieval_top1")}}}
    s = dict(head)
    for name in plan.names[:people]:
        results.append(run_person(plan, scorer, name, out / name, world, recipe, steps=steps, guidance=guidance))
        log.info("oracle %s: %s (%.0f s)", name, results[-1]["per_person"], results[-1]["seconds"])
        s = {**head, **summarize(results, reference, ceiling, plan.names),
             "seconds_per_person": [r["seconds"] for r in results]}
        if archive is not None:
            atomic_write_text(archive / "lora_oracle.json", json.dumps(s, indent=1) + "\n")
            write_grid(results, out, archive / "lora_oracle.png", plan)
    return s
