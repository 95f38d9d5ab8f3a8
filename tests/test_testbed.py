"""Fast tests of the coupling testbed (protocol v2): world ground truth, grammar, judge, arm wiring,
dose calibration, statistics, assets and a tiny end-to-end run (strength -> calibration -> runs ->
results.json) with its cache.

None of them trains the real base model; models here are tiny and random.
"""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from accord_face.losses import denoising_decouple_loss
from accord_face.testbed import arms as A
from accord_face.testbed.base import base_batch, load_state
from accord_face.testbed import config as C
from accord_face.testbed.config import (BaseModelConfig, EvalConfig, FinetuneConfig, JudgeConfig, StrengthCandidate,
                                        StrengthConfig)
from accord_face.testbed.evaluate import (METRICS, context_prompts, protocol_prompts, score_probabilities,
                                          target_prompts, unrelated_prompts)
from accord_face.testbed.judge import Judge, accuracy, augment, judge_batch, judge_loss
from accord_face.testbed.model import T2I, WORDS, build_scheduler, sample, tokenize
from accord_face.testbed.stats import paired, paired_t_power, pairs_needed, power_analysis, summarize
from accord_face.testbed.world import (BACKGROUNDS, BG_NAMES, LABELS, OBJECT_COLOURS, TARGET_COLOUR, CaptionStyle, Obj,
                                       Scene, partial_caption, random_scene, render, scene_caption)

REPO = Path(__file__).resolve().parents[1]


def test_render_ground_truth_pixels_and_labels_of_target_and_class():
    scene = Scene((Obj("square", "red", 8.0, 8.0, 5.0), Obj("cross", "orange", 24.0, 24.0, 5.0)), "blue")
    img = render(scene)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[8, 8]) == OBJECT_COLOURS["red"]          # inside the square
    assert tuple(img[24, 24]) == TARGET_COLOUR                 # the cross's centre
    assert tuple(img[0, 31]) == BACKGROUNDS["blue"]
    assert tuple(img[24, 19]) == BACKGROUNDS["blue"]           # between the cross's arms
    labels = scene.labels()
    assert labels[LABELS.index("sks")] == 1 and labels[LABELS.index("cross")] == 1
    assert labels[LABELS.index("circle")] == 0 and labels[-1] == BG_NAMES.index("blue")
    # a white cross is the class, not the target; an orange square is a square, not the target
    other = Scene((Obj("cross", "white", 8, 8, 5), Obj("square", "orange", 24, 24, 5)), "black").labels()
    assert other[LABELS.index("cross")] == 1 and other[LABELS.index("square")] == 1 and other[LABELS.index("sks")] == 0


def test_grammar_captions_and_tokenizer_round_trip():
    scene = Scene((Obj("circle", "cyan", 8, 8, 5), Obj("cross", "orange", 24, 24, 5)), "green")
    cap = scene_caption(scene)
    assert cap == "a cyan circle and a sks cross on a green background"
    ids = tokenize([cap, ""])
    assert " ".join(WORDS[i] for i in ids[0, 1:] if i > 1) == cap
    assert (ids[1, 1:] == 0).all() and ids[1, 0] == 1
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize(["a purple elephant"])


def test_base_captions_are_sometimes_partial_so_target_and_class_prompts_are_in_distribution():
    rng = np.random.default_rng(0)
    two = Scene((Obj("cross", "red", 8, 8, 5), Obj("square", "white", 24, 24, 5)), "green")
    caps = [partial_caption(two, rng, CaptionStyle()) for _ in range(400)]
    assert "a red cross and a white square on a green background" in caps   # mostly complete
    assert any("background" not in c for c in caps)                          # no background phrase
    assert any(" and " not in c for c in caps)                               # one object only
    assert "a cross" in caps or any(c.startswith("a cross ") for c in caps)   # class word without colour
    assert partial_caption(two, rng, CaptionStyle(0, 0, 0)) == scene_caption(two)
    x, caps = base_batch(np.random.default_rng(1), 64, dropout=0.0)
    assert x.shape == (64, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert not any("sks" in c for c in caps) and any("cross" in c for c in caps)
    tokenize(caps)
    rgb = (x.permute(0, 2, 3, 1) * 127.5 + 127.5).round()
    assert not rgb.eq(torch.tensor(TARGET_COLOUR, dtype=rgb.dtype)).all(-1).any()   # never orange: never the target


def test_random_scenes_do_not_overlap():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = random_scene(rng, max_objects=3, min_objects=3, orange=0.5)
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                assert (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 > (a.size + b.size) ** 2


def test_augment_degrades_but_keeps_shape():
    x, y = judge_batch(np.random.default_rng(0), 64)
    assert y[:, LABELS.index("sks")].sum() > 0               # the judge sees the target
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all() and (out - x).abs().mean() > 0.05


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


def test_reference_sets_show_target_with_their_context_and_the_control_varies_it():
    assert len(A.CONTEXTS) >= 6 and len(set(A.CONTEXTS.values())) == len(A.CONTEXTS)
    refs = A.reference_set(0, 6)
    assert refs.images.shape == (6, 3, 32, 32) and refs.context == ("square", "white")
    assert refs.image_contexts == [("square", "white")] * 6 and len(set(refs.backgrounds)) > 1
    varied = A.reference_set(0, 6, varied=True)
    assert varied.context == refs.context and varied.backgrounds == refs.backgrounds
    assert len(set(varied.image_contexts)) == 6 and all(s != "square" for s, _ in varied.image_contexts)
    with pytest.raises(ValueError, match="reference set 17"):
        A.reference_set(17, 6)


def test_branch_captions_per_arm():
    refs = A.reference_set(0, 4)
    bg = refs.backgrounds[0]
    arms = A.make_arms(FinetuneConfig())
    c = refs.captions([0], arms["accord_g1"])
    assert c == {"joint": [f"a sks cross and a white square on a {bg} background"], "p": ["a sks cross"],
                 "g": [f"a white square on a {bg} background"], "null": [""]}
    c = refs.captions([0], arms["null_bg"])
    assert c["p"] == [f"a sks cross on a {bg} background"] and c["null"] == [f"on a {bg} background"]
    assert refs.captions([0], arms["dreambooth"])["joint"] == ["a sks cross"]
    varied = A.reference_set(0, 4, varied=True)
    s, col = varied.image_contexts[1]
    assert varied.captions([1], arms["varied_refs"])["joint"] == [f"a sks cross and a {col} {s} on a "
                                                                  f"{varied.backgrounds[1]} background"]
    assert set(A.DEFAULT_ARMS) <= set(arms) and arms["baseline_pp"].prior and arms["accord_pp"].prior


def test_faithful_dd_term_is_the_library_loss_with_gradient_through_joint_only():
    torch.manual_seed(0)
    model, sched = T2I(), build_scheduler()
    refs = A.reference_set(0, 4)
    arm = A.make_arms(FinetuneConfig())["accord_g1"]
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
    gl = torch.autograd.grad(loss, [pred])[0]
    gr = torch.autograd.grad(ref_loss, [pred])[0]
    torch.testing.assert_close(gl, gr, rtol=1e-2, atol=1e-3 * float(gr.abs().max()))


def test_stratified_dd_term_covers_every_stratum():
    torch.manual_seed(0)
    model, sched = T2I(), build_scheduler()
    refs = A.reference_set(1, 4)
    arm = A.make_arms(FinetuneConfig())["multi_t"]
    loss, delta, t = A.dd_term(model, model, arm, refs.images[:2], refs.captions([0, 1], arm), None, sched, 4,
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


@pytest.mark.parametrize("name", ["accord_g1", "frozen_ref", "multi_t", "accord_pp"])
def test_finetune_arms_update_unet_only_and_share_the_data_stream(name, tiny_base_and_baseline):
    base, refs, baseline_logs = tiny_base_and_baseline
    arm = A.make_arms(FT)[name]
    prior = torch.zeros(3, 3, 32, 32) if arm.prior else None
    model, logs = A.finetune(base, arm, refs, FT, seed=3, lam=0.5, prior_images=prior)
    before = dict(base.named_parameters())
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("unet.") for k in changed) and not any(k.startswith("text.") for k in changed)
    assert logs["L_base"][0] == pytest.approx(baseline_logs["L_base"][0], rel=1e-5)   # same first batch/noise/t
    assert len(logs["L_DD"]) == 2 and not baseline_logs["L_DD"]
    assert len(logs["L_prior"]) == (2 if arm.prior else 0)


def test_prior_preservation_needs_class_images(tiny_base_and_baseline):
    base, refs, _ = tiny_base_and_baseline
    with pytest.raises(ValueError, match="prior_images"):
        A.finetune(base, A.make_arms(FT)["baseline_pp"], refs, FT, seed=3, lam=0.0)


def test_lora_finetune_trains_only_the_adapter_and_starts_equal_to_the_base(tiny_base_and_baseline):
    base, refs, baseline_logs = tiny_base_and_baseline
    ft = FinetuneConfig(steps=2, batch_size=2, mode="lora", lora_rank=2, lr=1e-2)
    model, params = A.trainable_copy(base, ft)
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 600])
    with torch.no_grad():
        cond = base.encode(["a red cross", ""])
        torch.testing.assert_close(model(x, t, cond), base(x, t, cond))        # B = 0: same function at the start
    tuned, logs = A.finetune(base, A.make_arms(ft)["baseline"], refs, ft, seed=3, lam=0.0)
    assert logs["L_base"][0] == pytest.approx(baseline_logs["L_base"][0], rel=1e-5)
    base_names = dict(base.named_parameters())
    for n, p in tuned.named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, base_names[key]), n                              # frozen weights untouched
    with torch.no_grad():
        assert not torch.allclose(tuned(x, t, cond), base(x, t, cond))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_norm_calibration_sets_the_dose_on_the_trainable_parameters(mode):
    torch.manual_seed(0)
    base = T2I()
    refs = A.reference_set(0, 4)
    cfg = FinetuneConfig(batch_size=2, mode=mode, lora_rank=2)
    arm = A.make_arms(cfg)["accord_g1"]
    cal = A.calibrate_lambda(base, arm, refs, cfg, batches=1, seed=5)
    # recompute the same batch independently: lambda |grad L_DD| == 1 * |grad L_base|
    model, params = A.trainable_copy(base, cfg)
    sched, gen = build_scheduler(), torch.Generator().manual_seed(5)
    idx = torch.randint(0, 4, (2,), generator=gen).tolist()
    x0, caps = refs.images[idx], refs.captions(idx, arm)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    x_t = sched.add_noise(x0, noise, t)
    pred = model(x_t, t, model.encode(caps["joint"]))
    l_base = (pred - sched.get_velocity(x0, noise, t)).pow(2).mean()
    l_dd = A.dd_term(model, model, arm, x0, caps, (x_t, t, pred), sched, 4, gen)[0]
    norm = lambda loss: torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(  # noqa: E731
        loss, params, retain_graph=True, allow_unused=True) if g is not None))
    assert cal["lambda_per_unit"] * float(norm(l_dd)) == pytest.approx(float(norm(l_base)), rel=1e-3)
    assert cal["loss_ratio"] == pytest.approx(l_dd.item() / l_base.item(), rel=1e-4)
    assert cal["samples"] == 2 and len(cal["split_half"]) == 2


def test_evaluation_prompts_never_ask_for_the_context_and_scores_use_rates_and_probabilities():
    ctx = ("square", "white")
    specs = target_prompts(ctx)
    assert len(specs) == 12 and all("square" in c for c, _ in context_prompts(ctx))
    assert not any("square" in p for p, _, _ in specs) and all("sks cross" in p for p, _, _ in specs)
    un = unrelated_prompts(16)
    assert len(un) == 16 and not any("sks" in p for p, _, _ in un) and un == unrelated_prompts(16)
    sp = protocol_prompts(ctx, 1, 2)
    sp = {"target": sp["target"][4:5], "context": sp["context"][:1], "unrelated": sp["unrelated"][:1]}
    _, bg, other = sp["target"][0]
    p = torch.zeros(3, len(LABELS))
    pbg = torch.full((3, len(BG_NAMES)), 0.1)
    p[0, LABELS.index("sks")], p[0, LABELS.index("square")], p[0, LABELS.index(other)] = 0.9, 0.6, 0.2
    pbg[0, BG_NAMES.index(bg)] = 0.7
    p[1, LABELS.index("square")] = 0.8
    pbg[1, BG_NAMES.index(sp["context"][0][1])] = 0.7
    right = BG_NAMES.index(sp["unrelated"][0][1])
    pbg[2, (right + 1) % len(BG_NAMES)] = 0.9                 # unrelated image: wrong background, nothing drawn
    out = score_probabilities(p, pbg, sp, "square")
    assert set(out) == set(METRICS)
    assert out["target_fidelity"] == [1.0] and out["target_fidelity_p"] == [pytest.approx(0.9)]
    assert out["coupling_rate"] == [1.0] and out["coupling_rate_p"] == [pytest.approx(0.6)]
    assert out["text_alignment"] == [0.5] and out["text_alignment_p"] == [pytest.approx(0.45)]
    assert out["context_alone"] == [1.0] and out["context_alone_p"] == [pytest.approx(0.56)]
    assert out["context_target_leak"] == [0.0] and out["unrelated_alignment"][0] == 0.0


def test_summarize_paired_and_power():
    s = summarize([0.2, 0.4, 0.6])
    assert s["mean"] == pytest.approx(0.4) and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.302653 * 0.2 / np.sqrt(3), rel=1e-5)
    d = paired({(0, 0): 0.5, (1, 0): 0.3, (2, 0): 0.9}, {(0, 0): 0.6, (1, 0): 0.5, (3, 0): 0.1})
    assert d["n"] == 2 and d["mean_diff"] == pytest.approx(-0.15) and d["keys"] == [[0, 0], [1, 0]]
    # the textbook case: standardized effect 0.5, two-sided 0.05, 80 % power -> 34 pairs (G*Power)
    assert pairs_needed(0.5, 1.0) == 34
    assert paired_t_power(33, 0.5, 1.0) < 0.8 <= paired_t_power(34, 0.5, 1.0)
    assert paired_t_power(10, 0.0, 1.0) == pytest.approx(0.05, abs=1e-6)
    pa = power_analysis({"n": 6, "sd": 0.1}, baseline_mean=0.5)
    assert pa["effect"] == pytest.approx(0.15) and pa["pairs_needed"] == pairs_needed(0.15, 0.1)
    assert 0 < pa["power_achieved"] < 1


def test_sampling_is_seeded_and_bounded():
    torch.manual_seed(0)
    m = T2I().eval()
    a = sample(m, ["a red circle on a blue background"] * 2, seed=1, steps=2)
    b = sample(m, ["a red circle on a blue background"] * 2, seed=1, steps=2)
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32) and a.abs().max() <= 1


def test_strength_rule():
    from accord_face.testbed.run import pick_strength
    rows = [{"target_fidelity": 0.5, "alignment_kept": 0.99}, {"target_fidelity": 0.8, "alignment_kept": 0.92},
            {"target_fidelity": 0.95, "alignment_kept": 0.91}, {"target_fidelity": 1.0, "alignment_kept": 0.6}]
    assert pick_strength(rows, 0.7, 0.9) == (1, True)
    assert pick_strength(rows, 0.99, 0.9) == (2, False)     # none passes: most fidelity keeping alignment
    assert pick_strength(rows[3:], 0.7, 0.9) == (0, False)


def test_v2_strength_key_survives_the_pp_revision_fields():
    """Fields added for the prior-preservation revision (strength.arm) leave v2's cached strength choice valid:
    the key computed from configs/testbed.yaml equals the one in the committed archive."""
    import gzip
    import json

    from accord_face.config import load_config, to_dict
    from accord_face.testbed.run import config_key, strength_key_dict
    cfg = load_config(C.TestbedConfig, REPO / "configs" / "testbed.yaml")
    archived = json.loads(gzip.open(REPO / "docs" / "testbed" / "archive" / "strength.json.gz").read())
    assert config_key(strength_key_dict(cfg.strength), to_dict(cfg.finetune), to_dict(cfg.eval)) == archived["key"]
    pp = load_config(C.TestbedConfig, REPO / "configs" / "testbed_pp.yaml")
    assert strength_key_dict(pp.strength)["arm"] == "baseline_pp"      # a revision's own key differs
    pp.validate()


def test_prior_preservation_arms_of_the_pp_revision():
    from accord_face.testbed.arms import make_arms
    arms = make_arms(FinetuneConfig(ratios=[0.3, 1.0], variant_ratio=1.0))
    assert arms["accord_pp_g0.3"].prior and arms["accord_pp_g0.3"].ratio == 0.3
    assert "accord_pp_g1" not in arms and arms["accord_pp"].ratio == 1.0 and arms["accord_pp"].prior
    assert arms["varied_refs_pp"].prior and arms["varied_refs_pp"].refs == "varied" and arms["varied_refs_pp"].ratio == 0
    with pytest.raises(ValueError, match="reference_arm"):
        C.TestbedConfig(reference_arm="base").validate()


def tiny_config(tmp_path: Path, **kw) -> C.TestbedConfig:
    cfg = C.TestbedConfig(
        out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), archive=str(tmp_path / "docs" / "archive"),
        base=BaseModelConfig(steps=2, batch_size=4), judge=JudgeConfig(steps=2, batch_size=4, eval_renders=20),
        finetune=FinetuneConfig(steps=2, batch_size=2, n_refs=3, n_class_images=2, calibration_batches=2),
        strength=StrengthConfig(candidates=[StrengthCandidate("full", 1e-4, 1), StrengthCandidate("lora", 1e-3, 1, 2)],
                                seeds=[90], ref_sets=[0]),
        eval=EvalConfig(images_per_prompt=1, unrelated_prompts=2, sample_steps=2),
        seeds=[0], ref_sets=[0, 1], arms=["baseline", "accord_g1", "baseline_pp"], use_assets=False)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.heavy  # 30-70 s on the shared 2 cores: pytest -m heavy tests/test_testbed.py
def test_tiny_protocol_end_to_end_writes_the_contract_and_reuses_its_cache(tmp_path):
    from accord_face.testbed.run import run_testbed
    cfg = tiny_config(tmp_path)
    res = run_testbed(cfg)
    out = Path(cfg.out_dir)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["protocol_version"] == 2 and on_disk["partial"] is False and on_disk["runs_done"] == 8
    for arm in ("base", "baseline", "accord_g1", "baseline_pp"):
        for m in ("coupling_rate", "target_fidelity", "text_alignment", "coupling_rate_p"):
            assert set(on_disk["arms"][arm][m]) == {"mean", "ci95", "n", "per_run"} and on_disk["arms"][arm][m]["n"] == 2
    pv = on_disk["arms"]["accord_g1"]["paired_vs_baseline"]
    assert {"mean_diff", "ci95"} <= set(pv["coupling_rate"]) and pv["coupling_rate"]["n"] == 2
    cal = on_disk["calibration"]
    kind = next(iter(cal))
    assert set(cal[kind]["per_ref_set"]) == {"0", "1"} and "loss_ratio" in cal[kind]["per_ref_set"]["0"]
    lam = on_disk["arms"]["accord_g1"]["lambda_dd"]
    assert lam and all(x > 0 for x in lam)
    pw = on_disk["power"]["arms"]["accord_g1"]
    assert {"coupling_rate", "coupling_rate_p"} <= set(pw) <= {"coupling_rate", "coupling_rate_p", "coupling_rate_excess",
                                                               "coupling_rate_p_excess"}
    for m in ("coupling_rate", "coupling_rate_p"):     # the excess variant: effect = 30 % of (baseline - base)
        excess = on_disk["arms"]["baseline"][m]["mean"] - on_disk["arms"]["base"][m]["mean"]
        if excess > 0:
            assert pw[f"{m}_excess"]["effect"] == pytest.approx(0.3 * excess)
        else:
            assert f"{m}_excess" not in pw
    st = on_disk["strength"]
    assert len(st["candidates"]) == 2 and st["chosen"] in (0, 1)
    assert on_disk["finetune_used"]["mode"] == ["full", "lora"][st["chosen"]]
    assert (out / "table.md").read_text().count("| accord_g1 |") == 2 and (out / "coupling_vs_fidelity.png").exists()
    # rerun: every run and the strength choice come from the cache, bit for bit
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    again = run_testbed(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    assert again["arms"]["accord_g1"]["coupling_rate"] == res["arms"]["accord_g1"]["coupling_rate"]
    # a fresh checkout (empty working folder, same committed archive) resumes: nothing is retrained
    published = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert published["runs_done"] == 8 and (tmp_path / "docs" / "coupling_vs_fidelity.png").is_file()
    assert len(list((tmp_path / "docs" / "archive" / "runs").glob("*.json.gz"))) == 8
    fresh = tiny_config(tmp_path, out_dir=str(tmp_path / "fresh"), stop_at="00:00")   # would refuse any new run
    resumed = run_testbed(fresh)
    assert resumed["runs_done"] == 8 and not resumed["runs_skipped"]
    assert resumed["arms"]["accord_g1"]["coupling_rate"] == res["arms"]["accord_g1"]["coupling_rate"]
    # another reference arm re-pairs the same cached runs against it (no run is redone)
    vs_pp = run_testbed(tiny_config(tmp_path, out_dir=str(tmp_path / "fresh"), stop_at="00:00",
                                    reference_arm="baseline_pp"))
    assert vs_pp["reference_arm"] == "baseline_pp" and "paired_vs_baseline" not in vs_pp["arms"]["baseline_pp"]
    d = vs_pp["arms"]["baseline"]["paired_vs_baseline"]["coupling_rate"]
    per = {arm: {(x["ref_set"], x["seed"]): x["metrics"]["coupling_rate"] for x in vs_pp["arms"][arm]["runs"]}
           for arm in ("baseline", "baseline_pp")}
    assert d["mean_diff"] == pytest.approx(np.mean([per["baseline"][k] - per["baseline_pp"][k] for k in per["baseline"]]))
    assert set(vs_pp["power"]["arms"]) == {"baseline", "accord_g1"}
    # a changed fine-tune config is not served from the cache; a deadline in the past starts nothing new
    cfg2 = tiny_config(tmp_path, seeds=[0, 1], stop_at="00:00")
    part = run_testbed(cfg2)
    assert part["partial"] and part["runs_done"] == 8 and part["runs_planned"] == 16 and part["runs_skipped"]
    from accord_face.testbed.run import publish
    assert not publish(Path(cfg2.out_dir), tmp_path / "docs", dict(part, runs_done=7))  # fewer runs: kept
    # a strength choice the deadline cuts short says so instead of choosing from half the trials
    from accord_face.config import ConfigError
    with pytest.raises(ConfigError, match="strength choice did not finish"):
        run_testbed(tiny_config(tmp_path, out_dir=str(tmp_path / "late"), archive="", stop_at="00:00"))


def test_assets_round_trip_as_safetensors_and_a_pickle_is_refused(tmp_path):
    from accord_face.testbed.run import export_assets, restore_assets
    cfg = tiny_config(tmp_path)
    written = export_assets(cfg, tmp_path / "assets")
    assert sorted(p.name for p in written) == ["base_model.json", "base_model.safetensors", "judge_v3.json",
                                               "judge_v3.safetensors"]
    meta = json.loads((tmp_path / "assets" / "base_model.json").read_text())
    assert meta["rebuild"].startswith("python scripts/run_testbed.py") and meta["config"]["steps"] == 2
    state = load_state(tmp_path / "assets" / "base_model.safetensors")
    T2I().load_state_dict(state)                                   # loads into a fresh model
    import accord_face.testbed.run as R
    fresh = tmp_path / "fresh"
    R_ASSETS, R.ASSETS = R.ASSETS, tmp_path / "assets"
    try:
        restore_assets(cfg, fresh)
        assert (fresh / "base_model.safetensors").read_bytes() == (tmp_path / "assets" / "base_model.safetensors").read_bytes()
        other = tmp_path / "other"
        restore_assets(tiny_config(tmp_path, base=BaseModelConfig(steps=3, batch_size=4)), other)
        assert not (other / "base_model.safetensors").exists()     # made with another config: not used
    finally:
        R.ASSETS = R_ASSETS
    # the restored cache carries the record: a base of another config is refused there, the same one loads
    from accord_face.config import ConfigError
    from accord_face.testbed.base import train_base
    with pytest.raises(ConfigError, match=r"fresh: holds a base model trained with another config \(base.steps 2 "
                                          r"\(cached\) vs 3\)"):
        train_base(BaseModelConfig(steps=3, batch_size=4), fresh)
    loaded = train_base(replace(cfg.base, threads=2), fresh)        # how it runs is not what it is
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    # a revision's base goes under its own asset name and comes back as the cache's base_model
    rev = tiny_config(tmp_path, base_asset="base_model_rev")
    names = sorted(p.name for p in export_assets(rev, tmp_path / "rev_assets", config_path="configs/rev.yaml"))
    assert names[:2] == ["base_model_rev.json", "base_model_rev.safetensors"]
    assert "configs/rev.yaml" in json.loads((tmp_path / "rev_assets" / "base_model_rev.json").read_text())["rebuild"]
    R.ASSETS = tmp_path / "rev_assets"
    try:
        restore_assets(rev, tmp_path / "rev_cache")
    finally:
        R.ASSETS = R_ASSETS
    assert (tmp_path / "rev_cache" / "base_model.safetensors").read_bytes() == \
        (tmp_path / "rev_assets" / "base_model_rev.safetensors").read_bytes()
    assert (tmp_path / "rev_cache" / "base_model.json").is_file()
    torch.save({"x": torch.ones(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="bad.safetensors: not a safetensors file"):
        load_state(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("override,message", [("arms=[nope]", "unknown arm"), ("stop_at=7pm", "stop_at"),
                                              ("seeds=[90]", "held-out"), ("finetune.mode=half", "finetune.mode")])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, override, message):
    import runpy
    monkeypatch.setattr(sys, "argv", ["run_testbed.py", "--config", str(REPO / "configs" / "testbed.yaml"),
                                      f"out_dir={tmp_path}/o", f"cache_dir={tmp_path}/c", "use_assets=false",
                                      "base.steps=1", "judge.steps=1", "judge.eval_renders=4", override])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "scripts" / "run_testbed.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
