"""ACCORD losses against independent formulas and the scheduler's own step."""

import pytest
import torch
from diffusers import DDPMScheduler

from accord_face import losses

T = 1000


def make_scheduler(prediction_type="epsilon", schedule="scaled_linear"):
    return DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule,
                         clip_sample=False, prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_posterior_mean_matches_scheduler_step(prediction_type, schedule):
    sched = make_scheduler(prediction_type, schedule)
    sched.set_timesteps(T)  # one training step per inference step: prev_t = t - 1
    torch.manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8)
    for t in [0, 1, 10, 500, 999]:
        seed = 1234 + t
        prev = sched.step(out, t, x_t, generator=torch.Generator().manual_seed(seed)).prev_sample
        # Remove the noise step() adds for t > 0: std * randn drawn from the same generator.
        if t > 0:
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
            prev = prev - sched._get_variance(t) ** 0.5 * noise
        ours = losses.posterior_mean(sched, x_t, out, torch.full((2,), t))
        # step() derives beta_t as 1 - abar_t / abar_{t-1} from float32 arrays,
        # which loses up to ~1e-4 of beta at small t; we use the stored betas.
        torch.testing.assert_close(ours, prev, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_posterior_mean_matches_float64_closed_form(prediction_type):
    sched = make_scheduler(prediction_type)
    torch.manual_seed(5)
    x_t, out = torch.randn(4, 4, 8, 8).double(), torch.randn(4, 4, 8, 8).double()
    t = torch.tensor([0, 1, 300, 999])
    beta = sched.betas.double()[t].view(-1, 1, 1, 1)
    abar = torch.cumprod(1 - sched.betas.double(), 0)
    a_t = abar[t].view(-1, 1, 1, 1)
    a_prev = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones(4).double()).view(-1, 1, 1, 1)
    x0 = {"epsilon": (x_t - (1 - a_t).sqrt() * out) / a_t.sqrt(),
          "v_prediction": a_t.sqrt() * x_t - (1 - a_t).sqrt() * out, "sample": out}[prediction_type]
    expected = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t
    ours = losses.posterior_mean(sched, x_t.float(), out.float(), t)
    torch.testing.assert_close(ours.double(), expected, rtol=2e-5, atol=2e-5)


def test_posterior_variance_matches_scheduler_and_uses_beta_at_zero():
    sched = make_scheduler()
    t = torch.tensor([0, 1, 250, 999])
    var = losses.posterior_variance(sched, t)
    for i, ti in enumerate(t.tolist()):
        expected = float(sched.betas[0]) if ti == 0 else float(sched._get_variance(ti))
        # the scheduler derives beta from float32 alphas_cumprod: agree to its precision
        assert var[i].item() == pytest.approx(expected, rel=1e-4)


def test_delta_equals_epsilon_space_form():
    sched = make_scheduler()
    torch.manual_seed(1)
    b = 6
    x_t = torch.randn(b, 4, 8, 8)
    e_pg, e_p, e_g, e_0 = (torch.randn(b, 4, 8, 8) for _ in range(4))
    t = torch.tensor([0, 1, 17, 400, 801, 999])
    _, delta = losses.denoising_decouple_loss(e_pg, e_p, e_g, e_0, x_t, t, sched)

    # Independent: the scheduler's betas / alphas_cumprod arrays, float64.
    betas = sched.betas.double()[t]
    abar = sched.alphas_cumprod.double()[t]
    abar_prev = torch.where(t > 0, sched.alphas_cumprod.double()[(t - 1).clamp(min=0)], torch.ones(b).double())
    sigma2 = torch.where(t > 0, betas * (1 - abar_prev) / (1 - abar), betas)
    w = betas**2 / (2 * sigma2 * (1 - betas) * (1 - abar))
    sq = lambda a, c: (a.double() - c.double()).pow(2).sum(dim=(1, 2, 3))  # noqa: E731
    expected = w * (sq(e_pg, e_p) + sq(e_pg, e_g) - sq(e_pg, e_0))
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-6)


def test_loss_is_time_weighted_mean_of_abs_delta():
    sched = make_scheduler("v_prediction")
    torch.manual_seed(2)
    preds = [torch.randn(4, 4, 8, 8) for _ in range(4)]
    x_t = torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 3, 499, 999])
    loss, delta = losses.denoising_decouple_loss(*preds, x_t, t, sched)
    expected = ((t.float() + 1) / T * delta.abs()).mean()
    torch.testing.assert_close(loss, expected)
    assert delta.shape == (4,)
    # Squared norms are summed, not averaged: doubling the latent area doubles Delta_t.
    big = [torch.cat([p, p], dim=-1) for p in preds]
    _, delta_big = losses.denoising_decouple_loss(*big, torch.cat([x_t, x_t], -1), t, sched)
    torch.testing.assert_close(delta_big, 2 * delta, rtol=1e-4, atol=1e-4)


def test_identical_branches_give_zero_delta():
    sched = make_scheduler()
    p = torch.randn(3, 4, 8, 8)
    loss, delta = losses.denoising_decouple_loss(p, p, p, p, torch.randn_like(p), torch.tensor([5, 50, 500]), sched)
    assert loss.item() == 0.0 and torch.all(delta == 0)


def test_ddloss_gradient_only_into_joint():
    sched = make_scheduler()
    preds = [torch.randn(2, 4, 8, 8, requires_grad=True) for _ in range(4)]
    x_t = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss, _ = losses.denoising_decouple_loss(*preds, x_t, torch.tensor([10, 900]), sched)
    loss.backward()
    assert preds[0].grad is not None and preds[0].grad.abs().sum() > 0
    for p in preds[1:] + [x_t]:
        assert p.grad is None


def test_ddloss_rejects_mismatched_shapes_and_timesteps():
    sched = make_scheduler()
    p = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        losses.denoising_decouple_loss(p, p, p, torch.randn(2, 4, 8, 4), p, torch.tensor([1, 2]), sched)
    with pytest.raises(ValueError, match="timesteps"):
        losses.denoising_decouple_loss(p, p, p, p, p, torch.tensor([1, 2, 3]), sched)
    with pytest.raises(ValueError, match="0, 999"):
        losses.denoising_decouple_loss(p, p, p, p, p, torch.tensor([1, 1000]), sched)


def test_prior_loss_matches_independent_formula():
    torch.manual_seed(3)
    f_p, f_s, f_g = torch.randn(5, 16), torch.randn(16), torch.randn(5, 3, 16)
    got = losses.prior_decouple_loss(f_p, f_s, f_g)
    n = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    cos_p = (n(f_p)[:, None, :] * n(f_g)).sum(-1)
    cos_s = (n(f_s)[None, None, :] * n(f_g)).sum(-1)
    torch.testing.assert_close(got, (cos_p - cos_s).abs().mean())


def test_prior_loss_zero_at_superclass_and_scale_invariant():
    torch.manual_seed(4)
    f_s, f_g = torch.randn(4, 8), torch.randn(4, 8)
    assert losses.prior_decouple_loss(f_s.clone(), f_s, f_g).item() == pytest.approx(0.0, abs=1e-7)
    f_p = torch.randn(4, 8)
    base = losses.prior_decouple_loss(f_p, f_s, f_g)
    scales = torch.rand(4, 1) * 10 + 0.1
    torch.testing.assert_close(losses.prior_decouple_loss(f_p * scales, f_s * 3.0, f_g * scales.flip(0)), base)
    assert base.item() > 0


def test_prior_loss_gradient_only_into_target():
    f_p, f_s, f_g = (torch.randn(2, 8, requires_grad=True) for _ in range(3))
    losses.prior_decouple_loss(f_p, f_s, f_g).backward()
    assert f_p.grad is not None and f_p.grad.abs().sum() > 0
    assert f_s.grad is None and f_g.grad is None


def test_prior_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="f_g"):
        losses.prior_decouple_loss(torch.randn(2, 8), torch.randn(8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="f_p"):
        losses.prior_decouple_loss(torch.randn(8), torch.randn(8), torch.randn(8))


def test_quartile_means_groups_by_timestep():
    values = torch.tensor([1.0, 3.0, 10.0, 20.0])
    t = torch.tensor([0, 249, 600, 999])
    assert losses.quartile_means(values, t, T) == {0: 2.0, 2: 10.0, 3: 20.0}


def test_losses_module_imports_nothing_from_package():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(losses))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("accord_face")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_by_prediction_type(prediction_type):
    sched = make_scheduler(prediction_type)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": x0,
                "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(losses.denoising_target(sched, x0, noise, t), expected)
    # The target and posterior_mean agree: feeding the true target back recovers the true posterior mean.
    x_t = sched.add_noise(x0, noise, t)
    from_target = losses.posterior_mean(sched, x_t, losses.denoising_target(sched, x0, noise, t), t)
    from_x0 = losses.posterior_mean(make_scheduler("sample"), x_t, x0, t)
    torch.testing.assert_close(from_target, from_x0, rtol=1e-4, atol=1e-4)
