"""Fast unit tests of the coupling testbed: world ground truth, grammar, judge, arm wiring.

None of them trains the base model; models here are tiny and random.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accord_face.losses import denoising_decouple_loss
from accord_face.testbed import arms as A
from accord_face.testbed.base import base_batch
from accord_face.testbed.config import FinetuneConfig
from accord_face.testbed.evaluate import context_prompts, score_target_images, summarize, target_prompts
from accord_face.testbed.judge import Judge, accuracy, augment, judge_batch, judge_loss
from accord_face.testbed.model import T2I, WORDS, build_scheduler, sample, tokenize
from accord_face.testbed.world import (BACKGROUNDS, BG_NAMES, OBJECT_COLOURS, SHAPES, TARGET_COLOUR, Obj, Scene,
                                       random_scene, render, scene_caption)


def test_render_ground_truth_pixels_and_labels():
    scene = Scene((Obj("square", "red", 8.0, 8.0, 5.0), Obj("xmark", "orange", 24.0, 24.0, 5.0)), "blue")
    img = render(scene)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[8, 8]) == OBJECT_COLOURS["red"]          # inside the square
    assert tuple(img[24, 24]) == TARGET_COLOUR                 # the X's crossing point
    assert tuple(img[0, 31]) == BACKGROUNDS["blue"]            # a corner far from both
    assert tuple(img[24, 19]) == BACKGROUNDS["blue"]           # between the X's arms
    labels = scene.labels()
    assert labels[SHAPES.index("square")] == 1 and labels[SHAPES.index("xmark")] == 1
    assert labels[SHAPES.index("circle")] == 0 and labels[-1] == BG_NAMES.index("blue")


def test_circle_and_square_differ_at_the_corners():
    circ = render(Scene((Obj("circle", "white", 16, 16, 6),), "black"))
    sq = render(Scene((Obj("square", "white", 16, 16, 6),), "black"))
    corner = (16 - 4, 16 - 4)  # inside the square (half side 5.1), outside the circle (radius 6 < 5.66? no: 5.66)
    assert sq[corner].mean() > 200
    assert circ[16 - 5, 16 - 5].mean() < 60   # distance 7.07 > radius 6


def test_grammar_captions_and_tokenizer_round_trip():
    scene = Scene((Obj("circle", "cyan", 8, 8, 5), Obj("xmark", "orange", 24, 24, 5)), "green")
    cap = scene_caption(scene)
    assert cap == "a cyan circle and a sks on a green background"
    ids = tokenize([cap, ""])
    assert " ".join(WORDS[i] for i in ids[0, 1:] if i > 1) == cap
    assert (ids[1, 1:] == 0).all() and ids[1, 0] == 1
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize(["a purple elephant"])


def test_random_scenes_do_not_overlap_and_base_data_never_shows_the_target():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = random_scene(rng, SHAPES, max_objects=3, min_objects=3)
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                assert (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 > (a.size + b.size) ** 2
    x, caps = base_batch(np.random.default_rng(1), 64, dropout=0.0)
    assert x.shape == (64, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert not any("sks" in c for c in caps)
    assert not (x.permute(0, 2, 3, 1) * 127.5 + 127.5).round().eq(torch.tensor(TARGET_COLOUR)).all(-1).any()


def test_augment_degrades_but_keeps_shape():
    x, _ = judge_batch(np.random.default_rng(0), 8)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y - x).abs().mean() > 0.05


def test_judge_learns_backgrounds_on_held_out_renders():
    torch.manual_seed(0)
    j = Judge(width=8)
    opt = torch.optim.Adam(j.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(40):
        x, y = judge_batch(rng, 16)
        loss = judge_loss(j, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = judge_batch(np.random.default_rng(99), 100)
    acc = accuracy(j, x, y)
    assert acc["background"] > 0.8, acc


def test_reference_sets_always_show_target_with_their_context():
    refs = A.reference_set(0, 6)
    assert refs.images.shape == (6, 3, 32, 32) and refs.context == ("square", "white")
    assert len(set(refs.backgrounds)) > 1
    other = A.reference_set(1, 6)
    assert other.context[0] != refs.context[0]
    with pytest.raises(ValueError, match="reference set 7"):
        A.reference_set(7, 6)


def test_branch_captions_per_arm():
    refs = A.reference_set(0, 4)
    bg = refs.backgrounds[0]
    arms = A.make_arms(FinetuneConfig())
    c = refs.captions([0], arms["accord_r0.1"])
    assert c == {"joint": [f"a sks and a white square on a {bg} background"], "p": ["a sks"],
                 "g": [f"a white square on a {bg} background"], "null": [""]}
    c = refs.captions([0], arms["null_bg"])
    assert c["p"] == [f"a sks on a {bg} background"] and c["null"] == [f"on a {bg} background"]
    assert refs.captions([0], arms["dreambooth"])["joint"] == ["a sks"]
    assert set(arms) >= {"dreambooth", "baseline", "accord_r0.03", "accord_r0.1", "accord_r0.3",
                         "frozen_ref", "multi_t", "warmup", "null_bg"}


def test_faithful_dd_term_is_the_library_loss_with_gradient_through_joint_only():
    torch.manual_seed(0)
    model, sched = T2I(), build_scheduler()
    refs = A.reference_set(0, 4)
    arm = A.make_arms(FinetuneConfig())["accord_r0.1"]
    caps = refs.captions([0, 1, 2], arm)
    x0 = refs.images[:3]
    t = torch.tensor([5, 400, 900])
    x_t = sched.add_noise(x0, torch.randn_like(x0), t)
    pred = model(x_t, t, model.encode(caps["joint"]))
    loss, delta, t_dd = A.dd_term(model, model, arm, x0, caps, (x_t, t, pred), sched, 4, torch.Generator())
    with torch.no_grad():  # independent: one forward per branch, unbatched
        p, g, n = (model(x_t, t, model.encode(caps[k])) for k in ("p", "g", "null"))
    ref_loss, ref_delta = denoising_decouple_loss(pred, p, g, n, x_t, t, sched)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-4, atol=1e-6)
    assert torch.equal(t_dd, t)
    # the gradient equals that of the same loss with every branch but the joint one detached
    gl = torch.autograd.grad(loss, [pred])[0]
    gr = torch.autograd.grad(ref_loss, [pred])[0]
    torch.testing.assert_close(gl, gr, rtol=1e-2, atol=1e-3 * float(gr.abs().max()))  # batched vs unbatched round-off


def test_stratified_dd_term_covers_every_stratum():
    torch.manual_seed(0)
    model, sched = T2I(), build_scheduler()
    refs = A.reference_set(1, 4)
    arm = A.make_arms(FinetuneConfig())["multi_t"]
    caps = refs.captions([0, 1], arm)
    loss, delta, t = A.dd_term(model, model, arm, refs.images[:2], caps, None, sched, 4,
                               torch.Generator().manual_seed(0))
    assert delta.shape == (8,) and loss.requires_grad
    assert sorted((t // 250).tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


FT = FinetuneConfig(steps=2, batch_size=2, dd_samples_per_image=2)


@pytest.fixture(scope="module")
def tiny_base_and_baseline():
    torch.manual_seed(0)
    base = T2I()
    refs = A.reference_set(0, 4)
    _, logs = A.finetune(base, A.make_arms(FT)["baseline"], refs, FT, seed=3, lam=0.0)
    return base, refs, logs


@pytest.mark.parametrize("name", ["accord_r0.1", "frozen_ref", "multi_t"])
def test_finetune_arms_update_unet_only_and_share_the_data_stream(name, tiny_base_and_baseline):
    base, refs, baseline_logs = tiny_base_and_baseline
    arm = A.make_arms(FT)[name]
    model, logs = A.finetune(base, arm, refs, FT, seed=3, lam=0.5)
    before = dict(base.named_parameters())
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("unet.") for k in changed)
    assert not any(k.startswith("text.") for k in changed)
    assert logs["L_base"][0] == pytest.approx(baseline_logs["L_base"][0], rel=1e-5)   # same first batch/noise/t
    assert len(logs["L_DD"]) == 2 and not baseline_logs["L_DD"]


def test_calibrated_lambda_hits_the_ratio_on_the_base_model():
    torch.manual_seed(0)
    base = T2I()
    refs = A.reference_set(0, 4)
    cfg = FinetuneConfig(batch_size=2)
    arm = A.make_arms(cfg)["accord_r0.3"]
    cal = A.calibrate_lambda(base, arm, refs, cfg, batches=2)
    assert cal["lambda"] * cal["L_DD"] / cal["L_base"] == pytest.approx(0.3)


def test_evaluation_prompts_never_ask_for_the_context_and_scoring_counts():
    ctx = ("square", "white")
    specs = target_prompts(ctx)
    assert len(specs) == 12 and all("square" in c for c, _ in context_prompts(ctx))
    assert not any("square" in p for p, _, _ in specs) and all("sks" in p for p, _, _ in specs)
    present = torch.zeros(2, len(SHAPES), dtype=torch.bool)
    present[0, SHAPES.index("xmark")] = True
    present[0, SHAPES.index("square")] = True
    present[1, SHAPES.index("circle")] = True
    two = [s for s in specs if s[2] == "circle"][:1] + [s for s in specs if s[2] == "circle"][:1]
    bg = torch.tensor([BG_NAMES.index(two[0][1]), (BG_NAMES.index(two[1][1]) + 1) % 4])
    out = score_target_images(present, bg, two, "square")
    assert out == {"target_fidelity": [1.0, 0.0], "coupling_rate": [1.0, 0.0], "text_alignment": [0.5, 0.5]}


def test_summarize_student_t_interval():
    s = summarize([0.2, 0.4, 0.6])
    assert s["mean"] == pytest.approx(0.4) and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.302653 * 0.2 / np.sqrt(3), rel=1e-5)


def test_sampling_is_seeded_and_bounded():
    torch.manual_seed(0)
    m = T2I().eval()
    a = sample(m, ["a red circle on a blue background"] * 2, seed=1, steps=2)
    b = sample(m, ["a red circle on a blue background"] * 2, seed=1, steps=2)
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32) and a.abs().max() <= 1


def test_stored_run_images_round_trip_through_npz_and_grid(tmp_path):
    from accord_face.testbed.model import to_uint8
    from accord_face.testbed.report import save_grid
    from accord_face.testbed.run import load_run_images
    x = torch.rand(48, 3, 32, 32) * 2 - 1
    save_grid(x, ["label"] * 48, tmp_path / "grid.png")
    from_grid = load_run_images(tmp_path / "run.json", tmp_path / "grid.png")
    np.testing.assert_array_equal(to_uint8(from_grid), to_uint8(x))
    np.savez_compressed(tmp_path / "run.npz", images=to_uint8(x))
    np.testing.assert_array_equal(to_uint8(load_run_images(tmp_path / "run.json", tmp_path / "nogrid.png")), to_uint8(x))
    with pytest.raises(FileNotFoundError, match="delete"):
        load_run_images(tmp_path / "other.json", tmp_path / "nogrid.png")
