"""The MeanFlow loss (METHODS 4): time sampling, the target at r = t, the JVP against finite differences,
CFG mixing, zero-init equality with the teacher, the reference-inconsistency switches, and bookkeeping."""

import math
from dataclasses import replace

import pytest
import torch

from model.attention import carries_tangent, use_jvp_attention
from model.latents import image_ids, pack_latents, text_ids
from model.loading import load_transformer
from model.meanflow import (
    MeanFlowConfig,
    average_velocity,
    average_velocity_jvp,
    cfg_mask,
    cfg_mix,
    loss_weights,
    meanflow_loss,
    meanflow_target,
    sample_draws,
    sample_times,
)
from model.text import PromptEmbeds

TEXT_LEN, TEXT_DIM = 7, 32


def make_batch(batch=4, seed=0, dtype=torch.float32):
    """Packed latents x0 [B, 4, 64] (a 4x4 latent), captions, the negative prompt (batch 1), image ids."""
    g = torch.Generator().manual_seed(seed)
    x0 = pack_latents(torch.randn(batch, 16, 4, 4, generator=g)).to(dtype)
    cond = PromptEmbeds(torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g).to(dtype),
                        torch.randn(batch, TEXT_DIM, generator=g).to(dtype), text_ids(TEXT_LEN, dtype=dtype))
    neg = PromptEmbeds(torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g).to(dtype),
                       torch.randn(1, TEXT_DIM, generator=g).to(dtype), text_ids(TEXT_LEN, dtype=dtype))
    return x0, cond, neg, image_ids(4, 4, dtype=dtype)


def load_student(path, zero_init=False):
    return use_jvp_attention(load_transformer(str(path), time_input_scale=1.0, dual_timestep=True,
                                              zero_init_dual=zero_init))


@pytest.fixture(scope="module")
def teacher(tiny_flux):
    return load_transformer(str(tiny_flux), time_input_scale=1.0).requires_grad_(False)


@pytest.fixture(scope="module")
def student(tiny_flux):
    """Copy-initialised second embedder (the reference's init): the student differs from the teacher."""
    return load_student(tiny_flux)


def target_inputs(x0, cond, neg, r, t, g, dropped):
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    z_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    return dict(z_t=z_t, v=eps - x0, r=r, t=t, g=g, cond=cond.where(dropped, neg), neg_cond=neg, dropped=dropped)


# ------------------------------------------------------------------------------------------- time sampling


@pytest.mark.parametrize("sampler", ["logit_normal", "uniform"])
def test_sample_times(sampler):
    config = MeanFlowConfig(time_sampler=sampler)
    r, t = sample_times(20000, torch.Generator().manual_seed(0), config)
    assert r.dtype == t.dtype == torch.float32 and r.shape == t.shape == (20000,)
    assert (r <= t).all() and (r > 0).all() and (t < 1).all()
    assert abs((r == t).float().mean().item() - 0.25) < 0.01  # P(r = t) = 1 - 0.75 (METHODS 8.14)
    distinct = r != t
    if sampler == "uniform":  # min and max of two uniforms: means 1/3 and 2/3
        assert abs(r[distinct].mean().item() - 1 / 3) < 0.01 and abs(t[distinct].mean().item() - 2 / 3) < 0.01
    else:  # sorting keeps the sum of the two logits: mean 2 mu
        logit_sum = torch.logit(r[distinct].double()) + torch.logit(t[distinct].double())
        assert abs(logit_sum.mean().item() - 2 * config.time_mu) < 0.05
    r1, t1 = sample_times(20000, torch.Generator().manual_seed(0), replace(config, ratio_r_not_equal_t=1.0))
    assert (r1 < t1).all()
    r0, t0 = sample_times(100, torch.Generator().manual_seed(0), replace(config, ratio_r_not_equal_t=0.0))
    assert torch.equal(r0, t0)


def test_config_rejects_unknown_choices():
    for bad in [dict(weighting="huber"), dict(jvp_tangent="x"), dict(cfg_delta="r"), dict(path_type="cosine"),
                dict(time_sampler="beta"), dict(ratio_r_not_equal_t=1.5), dict(guidance_scales=())]:
        with pytest.raises(ValueError):
            MeanFlowConfig(**bad)


# ------------------------------------------------------------------------------------------------ targets


def test_target_at_r_equals_t_is_the_teacher_velocity(student, teacher):
    x0, cond, neg, ids = make_batch(batch=6)
    config = MeanFlowConfig(ratio_r_not_equal_t=0.0)
    d = sample_draws(x0, torch.Generator().manual_seed(1), config)
    assert torch.equal(d.r, d.t)
    inputs = target_inputs(x0, cond, neg, d.r, d.t, d.g, d.dropped)
    target = meanflow_target(student, teacher, img_ids=ids, config=config, **inputs)
    assert torch.equal(target.u_tgt, target.v_T) and not target.cfg_mask.any()
    assert target.du_dt.norm() > 1e-2 and target.v_T.norm() > 1e-2  # not trivially zero
    # r != t: the (t - r) du/dt term moves the target away from v_T
    # r != t: u_tgt = v_T - (t - r) du/dt, checked against a finite difference of the student along (v_T, 0, 1)
    r = d.t * 0.5
    moved = meanflow_target(student, teacher, img_ids=ids, config=config, **{**inputs, "r": r})
    h, z_t, t, g, c = 1e-2, inputs["z_t"], d.t, d.g, inputs["cond"]
    with torch.no_grad():
        fd = (average_velocity(student, z_t + h * moved.v_T, r, t + h, g, c, ids)
              - average_velocity(student, z_t - h * moved.v_T, r, t - h, g, c, ids)) / (2 * h)
    expected = (t - r)[:, None, None] * fd
    assert expected.norm() > 1e-2
    assert ((moved.v_T - moved.u_tgt) - expected).norm() / expected.norm() < 1e-2


def test_target_at_r_equals_t_with_cfg_is_v_tilde(student, teacher):
    x0, cond, neg, ids = make_batch(batch=5)
    config = MeanFlowConfig(ratio_r_not_equal_t=0.0, use_cfg_meanflow=True, cfg_omega=0.6, cfg_kappa=0.3)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.95])
    g = torch.tensor([4.0, 4.5, 5.0, 4.0, 4.5])
    inputs = target_inputs(x0, cond, neg, t, t, g, torch.zeros(5, dtype=torch.bool))
    target = meanflow_target(student, teacher, img_ids=ids, config=config, **inputs)
    assert target.cfg_mask.all()
    assert torch.equal(target.u_tgt, target.v_base)
    with torch.no_grad():  # u_c, u_u at r = t, evaluated separately
        u_c = average_velocity(student, inputs["z_t"], t, t, g, cond, ids)
        u_u = average_velocity(student, inputs["z_t"], t, t, g, neg.repeat_interleave(5), ids)
    v_tilde = 0.6 * target.v_T + 0.3 * u_c + 0.1 * u_u
    assert torch.allclose(target.u_tgt, v_tilde, atol=1e-5)
    assert (v_tilde - target.v_T).norm() > 1e-2  # CFG did change the target


def test_cfg_mix_formula():
    v_T, u_c, u_u = torch.full((2, 3), 2.0), torch.full((2, 3), 3.0), torch.full((2, 3), 5.0)
    assert torch.allclose(cfg_mix(v_T, u_c, u_u, omega=0.5, kappa=0.25), torch.full((2, 3), 3.0))
    assert torch.allclose(cfg_mix(v_T, u_c, u_u, omega=0.0, kappa=1.0), u_c)
    assert torch.allclose(cfg_mix(v_T, u_c, u_u, omega=0.0, kappa=0.0), u_u)
    assert torch.equal(cfg_mix(v_T, u_c, u_u, omega=1.0, kappa=0.0), v_T)  # the CLI default: no CFG


def test_cfg_only_inside_the_time_window_and_not_for_dropped_samples(student, teacher):
    t = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.9, 0.6])
    dropped = torch.tensor([False, False, True, False, False, False])
    config = MeanFlowConfig(use_cfg_meanflow=True, cfg_min_t=0.3, cfg_max_t=0.8, cfg_omega=0.5, cfg_kappa=0.2)
    expected = torch.tensor([False, True, False, True, False, True])
    assert torch.equal(cfg_mask(t, dropped, config), expected)
    assert not cfg_mask(t, dropped, replace(config, use_cfg_meanflow=False)).any()

    x0, cond, neg, ids = make_batch(batch=6)
    g = torch.full((6,), 4.5)
    inputs = target_inputs(x0, cond, neg, t * 0.5, t, g, dropped)
    target = meanflow_target(student, teacher, img_ids=ids, config=config, **inputs)
    assert torch.equal(target.cfg_mask, expected)
    assert torch.equal(target.v_base[~expected], target.v_T[~expected])
    differs = (target.v_base - target.v_T).flatten(1).norm(dim=1)
    assert (differs[expected] > 1e-3).all()


# --------------------------------------------------------------------------------------------------- JVP


def test_jvp_matches_central_differences(tiny_flux):
    """du/dt along (v, 0, 1) equals (u(z + h v, r, t + h) - u(z - h v, r, t - h)) / 2h in fp64.

    diffusers applies RoPE in fp32 even in an fp64 model, hence h = 3e-3 and a 1e-4 relative tolerance.
    """
    model = load_student(tiny_flux).double()
    x0, cond, _, ids = make_batch(batch=3, seed=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    r = torch.tensor([0.1, 0.4, 0.7], dtype=torch.float64)
    t = torch.tensor([0.5, 0.45, 0.9], dtype=torch.float64)
    g = torch.tensor([4.0, 4.5, 5.0], dtype=torch.float64)
    h = 3e-3

    def u(z, r, t):
        with torch.no_grad():
            return average_velocity(model, z, r, t, g, cond, ids)

    u0, du_dt = average_velocity_jvp(model, z, r, t, v, g, cond, ids)
    assert torch.allclose(u0, u(z, r, t), atol=1e-12)
    fd = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    assert fd.norm() > 1e-2
    assert (du_dt - fd).norm() / fd.norm() < 1e-4
    # not vacuous: dropping the z direction, or the t - r input's dependence on t, changes the derivative
    fd_no_z = (u(z, r, t + h) - u(z, r, t - h)) / (2 * h)
    fd_fixed_gap = (u(z + h * v, r + h, t + h) - u(z - h * v, r - h, t - h)) / (2 * h)
    assert (du_dt - fd_no_z).norm() / fd.norm() > 1e-2
    assert (du_dt - fd_fixed_gap).norm() / fd.norm() > 1e-3


# ------------------------------------------------------------------------------------------------- loss


def test_zero_init_student_equals_teacher_so_the_loss_starts_at_zero(tiny_flux, student, teacher):
    x0, cond, neg, ids = make_batch(batch=6)
    config = MeanFlowConfig(ratio_r_not_equal_t=0.0, cfg_prob=0.5)
    zero_init = load_student(tiny_flux, zero_init=True)
    loss, logs = meanflow_loss(zero_init, teacher, x0, cond, neg, ids, config, torch.Generator().manual_seed(0))
    assert 0 < logs["frac_dropped"] < 1 and logs["frac_r_eq_t"] == 1
    assert logs["loss_mean_ref"] == 0 and loss.item() == 0
    # the copy-initialised student (the reference's) does not start at the teacher
    loss, logs = meanflow_loss(student, teacher, x0, cond, neg, ids, config, torch.Generator().manual_seed(0))
    assert logs["loss_mean_ref"] > 1e-6


def test_loss_uses_its_draws_label_dropout_and_guidance(student, teacher):
    """The teacher sees z_t = (1 - t) x0 + t eps, t, g and the dropped-out prompt drawn by sample_draws."""
    x0, cond, neg, ids = make_batch(batch=8)
    config = MeanFlowConfig(cfg_prob=0.5)
    d = sample_draws(x0, torch.Generator().manual_seed(4), config)
    assert 0 < d.dropped.sum() < 8 and len(set(d.g.tolist())) > 1
    seen = {}
    hook = teacher.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        meanflow_loss(student, teacher, x0, cond, neg, ids, config, torch.Generator().manual_seed(4))
    finally:
        hook.remove()
    assert torch.equal(seen["timestep"], d.t) and torch.equal(seen["guidance"], d.g)
    assert torch.allclose(seen["hidden_states"], (1 - d.t[:, None, None]) * x0 + d.t[:, None, None] * d.eps)
    prompts = seen["encoder_hidden_states"]
    assert torch.equal(prompts[d.dropped], neg.prompt_embeds.expand(int(d.dropped.sum()), -1, -1))
    assert torch.equal(prompts[~d.dropped], cond.prompt_embeds[~d.dropped])
    pooled = seen["pooled_projections"]
    assert torch.equal(pooled[d.dropped], neg.pooled_prompt_embeds.expand(int(d.dropped.sum()), -1))
    assert set(d.g.tolist()) <= set(config.guidance_scales)


def test_jvp_tangent_switch(student, teacher):
    x0, cond, neg, ids = make_batch(batch=4)
    r, t = torch.tensor([0.2, 0.5, 0.3, 0.7]), torch.tensor([0.6, 0.5, 0.9, 0.7])
    inputs = target_inputs(x0, cond, neg, r, t, torch.full((4,), 4.0), torch.zeros(4, dtype=torch.bool))
    targets = {tangent: meanflow_target(student, teacher, img_ids=ids, **inputs,
                                        config=MeanFlowConfig(jvp_tangent=tangent)).u_tgt
               for tangent in ("teacher", "data")}
    same = r == t
    assert torch.equal(targets["teacher"][same], targets["data"][same])
    gap = (targets["teacher"] - targets["data"])[~same].flatten(1).norm(dim=1)
    assert (gap > 1e-4).all()


def test_cfg_delta_switch_sets_timestep2_of_u_c_and_u_u(student, teacher):
    x0, cond, neg, ids = make_batch(batch=4)
    r, t = torch.tensor([0.2, 0.5, 0.3, 0.1]), torch.tensor([0.6, 0.5, 0.9, 0.7])
    dropped = torch.tensor([False, False, False, True])
    inputs = target_inputs(x0, cond, neg, r, t, torch.full((4,), 4.0), dropped)
    calls = []

    def record(module, args, kwargs):
        if not carries_tangent(kwargs["hidden_states"]):
            calls.append(kwargs["timestep2"].clone())

    hook = student.register_forward_pre_hook(record, with_kwargs=True)
    try:
        targets = {}
        for delta in ("zero", "t_minus_r"):
            calls.clear()
            config = MeanFlowConfig(use_cfg_meanflow=True, cfg_delta=delta, cfg_omega=0.5, cfg_kappa=0.3)
            targets[delta] = meanflow_target(student, teacher, img_ids=ids, config=config, **inputs).u_tgt
            assert len(calls) == 1 and calls[0].shape == (6,)  # one doubled batch [cond; neg] for 3 CFG samples
            expected = torch.zeros(6) if delta == "zero" else (t - r)[:3].repeat(2)
            assert torch.equal(calls[0], expected)
    finally:
        hook.remove()
    gap = (targets["zero"] - targets["t_minus_r"]).flatten(1).norm(dim=1)
    assert (gap[:3][r[:3] != t[:3]] > 1e-4).all() and gap[3] == 0  # the dropped sample has no CFG


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_off_during_the_jvp_and_restored(tiny_flux, teacher, enabled):
    model = load_student(tiny_flux)
    if enabled:
        model.enable_gradient_checkpointing()
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((carries_tangent(kwargs["hidden_states"]), m.gradient_checkpointing)),
        with_kwargs=True,
    )
    x0, cond, neg, ids = make_batch()
    loss, _ = meanflow_loss(model, teacher, x0, cond, neg, ids, MeanFlowConfig(), torch.Generator().manual_seed(0))
    loss.backward()
    assert model.gradient_checkpointing is enabled
    assert (True, False) in seen  # the JVP call ran without checkpointing
    assert (False, enabled) in seen  # the forward with grad ran with the flag as it was
    assert all(p.grad is not None for p in model.timestep_embedder2.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_same_seed_same_loss(student, teacher):
    x0, cond, neg, ids = make_batch(batch=6)
    config = MeanFlowConfig(use_cfg_meanflow=True, cfg_kappa=0.5)

    def run(seed):
        with torch.no_grad():
            return meanflow_loss(student, teacher, x0, cond, neg, ids, config, torch.Generator().manual_seed(seed))

    (a, logs_a), (b, logs_b), (_, logs_c) = run(5), run(5), run(6)
    assert torch.equal(a, b) and all(torch.equal(logs_a[k], logs_b[k]) for k in logs_a)
    assert not math.isclose(logs_a["loss_mean_ref"].item(), logs_c["loss_mean_ref"].item(), rel_tol=1e-3)


def test_loss_weights():
    L = torch.tensor([0.5, 3.0, 1e4])
    c = 1e-3
    assert torch.allclose(loss_weights(L, MeanFlowConfig()) * L, L / (L + c))
    assert torch.allclose(loss_weights(L, MeanFlowConfig(adaptive_p=0.5)) * L, L / (L + c).sqrt())
    assert torch.allclose(loss_weights(L, MeanFlowConfig(weighting="high_order")) * L, L * (L + c))
    assert torch.equal(loss_weights(L, MeanFlowConfig(weighting="uniform")) * L, L)
    L.requires_grad_(True)
    assert not loss_weights(L, MeanFlowConfig()).requires_grad  # w = 1 / sg(...)


def test_adaptive_weighting_makes_each_sample_weigh_one(student, teacher):
    x0, cond, neg, ids = make_batch(batch=6)
    run = lambda config: meanflow_loss(student, teacher, x0, cond, neg, ids, config,  # noqa: E731
                                       torch.Generator().manual_seed(3))
    loss, logs = run(MeanFlowConfig())
    assert 0.99 < loss.item() <= 1.0 and logs["loss"] == loss.detach()
    uniform, logs_u = run(MeanFlowConfig(weighting="uniform"))
    n_elements = x0[0].numel()
    assert torch.allclose(uniform, logs_u["loss_mean_ref"] * n_elements, rtol=1e-5)  # mean_b L_b
    assert not math.isclose(uniform.item(), 1.0, rel_tol=0.05)


def test_bf16_models_keep_fp32_targets(tiny_flux):
    student = load_student(tiny_flux).to(torch.bfloat16)
    teacher = load_transformer(str(tiny_flux), time_input_scale=1.0, dtype=torch.bfloat16)
    x0, cond, neg, ids = make_batch()
    config = MeanFlowConfig(use_cfg_meanflow=True, cfg_kappa=0.5)
    loss, logs = meanflow_loss(student, teacher, x0, cond.to(dtype=torch.bfloat16), neg.to(dtype=torch.bfloat16),
                               ids, config, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and logs["frac_cfg"] > 0
    loss.backward()
