"""sCM loss (METHODS 3): TrigFlow wrapper, JVP tangent, gradient of the loss, warmup, checkpointing, RNG, dtypes."""

import pytest
import torch

from model.attention import carries_tangent, use_jvp_attention
from model.conventions import trigflow_from_flow_velocity, trigflow_to_flow_input
from model.latents import image_ids, pack_latents, text_ids
from model.loading import load_transformer
from model.scm import SCMConfig, TrigFlowModel, sample_scm_draws, scm_loss, scm_loss_terms, scm_tangent
from model.text import PromptEmbeds

TEXT_LEN, TEXT_DIM = 7, 32


def make_models(tiny_flux, dtype=torch.float32, perturb=0.05):
    """Frozen teacher, and a student (JVP attention, logvar head) whose weights differ from the teacher's."""
    teacher = TrigFlowModel(load_transformer(str(tiny_flux), time_input_scale=1.0)).requires_grad_(False)
    student = TrigFlowModel(
        use_jvp_attention(load_transformer(str(tiny_flux), time_input_scale=1.0)),
        logvar_head=True,
        generator=torch.Generator().manual_seed(1),
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in student.transformer.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen) * p.std().nan_to_num(0))
    return teacher.to(dtype), student.to(dtype)


def batch(seed=0, dtype=torch.float32, size=2):
    g = torch.Generator().manual_seed(seed)
    x0_bar = pack_latents(torch.randn(size, 16, 4, 4, generator=g)).to(dtype)
    cond = PromptEmbeds(
        torch.randn(size, TEXT_LEN, TEXT_DIM, generator=g).to(dtype),
        torch.randn(size, TEXT_DIM, generator=g).to(dtype),
        text_ids(TEXT_LEN, dtype=dtype),
    )
    return x0_bar, cond, image_ids(4, 4, dtype=dtype)


def loss_terms(student, teacher, step=100, seed=0, data_seed=0, dtype=torch.float32, **config):
    x0_bar, cond, ids = batch(data_seed, dtype)
    config = SCMConfig(**{"tangent_warmup_steps": 400, **config})
    return scm_loss_terms(student, teacher, x0_bar, cond, ids, step, config, torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_trigflow_wrapper_equals_closed_form(tiny_flux):
    transformer = load_transformer(str(tiny_flux), time_input_scale=1.0)
    model = TrigFlowModel(transformer, logvar_head=True, generator=torch.Generator().manual_seed(0))
    assert model.transformer is transformer and "net.x_embedder.weight" in model.state_dict()
    x0_bar, cond, ids = batch(1)
    t, g = torch.tensor([0.2, 1.3]), torch.tensor([4.0, 5.0])
    cos, sin = torch.cos(t)[:, None, None], torch.sin(t)[:, None, None]
    v = transformer(
        hidden_states=x0_bar / (sin + cos), encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_prompt_embeds, timestep=(sin / (sin + cos)).flatten(), guidance=g,
        img_ids=ids, txt_ids=cond.text_ids, return_dict=False,
    )[0]
    expected = ((cos - sin) * x0_bar + v) / (sin + cos)
    F, logvar = model(x0_bar, t, g, cond, ids, return_logvar=True)
    assert F.dtype == torch.float32 and logvar.shape == (2, 1, 1)
    assert torch.allclose(F, expected, atol=1e-6)
    # ... which is the conventions module's conversion, and t as [B, 1, 1] gives the same
    x_flow, tau = trigflow_to_flow_input(x0_bar, t[:, None, None])
    assert torch.allclose(x_flow, x0_bar / (sin + cos)) and torch.allclose(tau.flatten(), (sin / (sin + cos)).flatten())
    assert torch.allclose(F, trigflow_from_flow_velocity(x0_bar, t[:, None, None], v), atol=1e-6)
    assert torch.equal(model(x0_bar, t[:, None, None], g, cond, ids), F)
    # the logvar head sees the conditioning vector of the ANGLE t (the reference's choice), not of tau
    head = model.logvar_linear
    by_angle = head(transformer.embed_conditioning(t, g, cond.pooled_prompt_embeds)).reshape(-1, 1, 1)
    by_tau = head(transformer.embed_conditioning(tau.flatten(), g, cond.pooled_prompt_embeds)).reshape(-1, 1, 1)
    assert torch.allclose(logvar, by_angle, atol=1e-6) and not torch.allclose(logvar, by_tau, atol=1e-4)
    bound = (6 / (transformer.inner_dim + 1)) ** 0.5  # Xavier-uniform, zero bias
    assert head.weight.abs().max() <= bound and head.weight.std() > bound / 4 and torch.equal(head.bias, torch.zeros(1))
    with pytest.raises(ValueError, match="log-variance head"):
        TrigFlowModel(transformer)(x0_bar, t, g, cond, ids, return_logvar=True)


@torch.no_grad()
def test_jvp_tangent_matches_central_difference_along_teacher_ode(tiny_flux):
    """F_dot = d/dh F(x + h cos t sin t F_pre, t + h cos t sin t) at h = 0, against a central difference in fp64.

    diffusers applies RoPE in fp32 even in an fp64 model (a constant, since the ids do not move), so h = 3e-3 keeps
    that rounding below the tolerance while the O(h^2) truncation error is smaller still.
    """
    teacher, student = make_models(tiny_flux, dtype=torch.float64)
    x0_bar, cond, ids = batch(2, torch.float64)
    gen = torch.Generator().manual_seed(3)
    x_tilde = 0.5 * x0_bar + torch.randn(x0_bar.shape, generator=gen, dtype=torch.float64)
    t, g = torch.tensor([0.35, 1.1], dtype=torch.float64), torch.tensor([4.0, 4.5], dtype=torch.float64)
    F_pre = teacher(x_tilde, t, g, cond, ids)
    F, F_dot = scm_tangent(student, x_tilde, t, F_pre, g, cond, ids)
    assert F.dtype == F_dot.dtype == torch.float64
    assert torch.allclose(F, student(x_tilde, t, g, cond, ids), atol=1e-12)

    h, cs = 3e-3, torch.cos(t) * torch.sin(t)
    dx, dt = cs[:, None, None] * F_pre, cs

    def F_at(s):
        return student(x_tilde + s * dx, t + s * dt, g, cond, ids)

    fd = (F_at(h) - F_at(-h)) / (2 * h)
    error = ((F_dot - fd).norm() / fd.norm()).item()
    assert error < 1e-4, error
    # not vacuous: the tangent is sizeable, and leaving out its time component (the d/dt through tau(t), the
    # flow-input scaling and the output conversion) misses the finite difference by far more than the tolerance
    assert fd.norm() > 1e-2 * F.norm()
    _, x_only = torch.func.jvp(lambda x: student(x, t, g, cond, ids), (x_tilde,), (dx,))
    assert ((x_only - fd).norm() / fd.norm()).item() > 100 * max(error, 1e-6)


def test_loss_gradient_equals_closed_form(tiny_flux):
    """METHODS 3.5: F_theta - F_minus = 0, so grad L = -2 lambda mean((w / e^l) g_hat dF_theta/dtheta)
    + lambda mean(1 - (w / e^l) g_hat^2) dl/dtheta; checked as the gradient of a surrogate with detached weights."""
    teacher, student = make_models(tiny_flux)
    lam = 0.7
    terms = loss_terms(student, teacher, scm_lambda=lam)
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(terms.loss, params)

    again = loss_terms(student, teacher, scm_lambda=lam)  # same generator seed, so the same draws
    assert torch.equal(again.t, terms.t) and torch.equal(again.g_hat, terms.g_hat)
    coeff = (again.weight / again.logvar.exp()).detach()
    tangent_part = -2 * lam * (coeff * again.g_hat * again.F_theta).mean()
    logvar_part = lam * ((1 - coeff * again.g_hat**2) * again.logvar).mean()
    g_tangent = torch.autograd.grad(tangent_part, params, retain_graph=True, allow_unused=True)
    g_logvar = torch.autograd.grad(logvar_part, params, allow_unused=True)

    names = [n for n, p in student.named_parameters() if p.requires_grad]
    checked = {"head": 0, "blocks": 0}
    for name, grad, a, b in zip(names, grads, g_tangent, g_logvar):
        expected = (torch.zeros_like(grad) if a is None else a) + (0 if b is None else b)
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7 * grad.abs().max().item() + 1e-9), name
        if name.startswith("logvar_linear"):  # the head only receives the logvar term
            assert a is None and grad.abs().max() > 0
            checked["head"] += 1
        elif "transformer_blocks" in name:  # the backbone blocks only receive the tangent term
            assert b is None or b.abs().max() == 0
            checked["blocks"] += 1
    assert checked["head"] == 2 and checked["blocks"] > 0
    # the loss value is lambda mean((w / e^l) g_hat^2 + l), and the gradient is not trivially zero
    value = lam * ((again.weight / again.logvar.exp()) * again.g_hat**2 + again.logvar).mean()
    assert torch.allclose(terms.loss, value, rtol=1e-5)
    assert max(g.abs().max() for g in grads) > 1e-4



def test_noising_weight_and_logs(tiny_flux):
    """x_t = cos t sigma_d x0_bar + sin t sigma_d eps from the generator's draws; w = 1 / (sigma_d tan t); the logs."""
    teacher, student = make_models(tiny_flux)
    terms = loss_terms(student, teacher, seed=9, sigma_data=0.6, logit_mean=0.2, logit_std=1.6, tangent_norm_eps=0.3)
    x0_bar, _, _ = batch(0)
    config = SCMConfig(sigma_data=0.6, logit_mean=0.2, logit_std=1.6)
    draws = sample_scm_draws(x0_bar.shape, config, torch.Generator().manual_seed(9))
    t = draws.t[:, None, None]
    assert torch.equal(terms.t, draws.t) and torch.equal(terms.guidance, draws.guidance)
    assert torch.allclose(terms.x_t, torch.cos(t) * 0.6 * x0_bar + torch.sin(t) * 0.6 * draws.eps, atol=1e-6)
    assert torch.allclose(terms.weight, 1 / (0.6 * torch.tan(t)))
    norms = terms.g.flatten(1).norm(dim=1)
    assert torch.allclose(terms.g_hat, terms.g / (norms[:, None, None] + 0.3))
    expected = {
        "loss_sCM": terms.loss, "l2_loss": terms.g_hat.square().mean(), "g_norm": norms.mean(),
        "mean_weight": terms.weight.mean(), "logvar": terms.logvar.mean(), "t_mean": draws.t.mean(),
    }
    assert set(terms.logs) == set(expected)
    for key, value in expected.items():
        assert not terms.logs[key].requires_grad and torch.allclose(terms.logs[key], value.detach()), key

@torch.no_grad()
def _expected_g(terms, r, sd=0.5):
    t = terms.t[:, None, None]
    F_minus = terms.F_theta.detach()
    return -torch.cos(t) ** 2 * (sd * F_minus - sd * terms.F_pre) - r * (
        torch.sin(t) * torch.cos(t) * terms.x_t + sd * terms.F_dot
    )


def test_tangent_warmup(tiny_flux):
    teacher, student = make_models(tiny_flux)
    start = loss_terms(student, teacher, step=0, tangent_warmup_steps=400)
    assert start.r == 0.0
    assert torch.allclose(start.g, _expected_g(start, 0.0), atol=1e-6)
    half = loss_terms(student, teacher, step=200, tangent_warmup_steps=400)
    full = loss_terms(student, teacher, step=0, tangent_warmup_steps=0)  # H = 0: no warmup
    late = loss_terms(student, teacher, step=10_000, tangent_warmup_steps=400)
    assert half.r == 0.5 and full.r == 1.0 and late.r == 1.0
    assert torch.allclose(half.g, _expected_g(half, 0.5), atol=1e-6)
    assert torch.allclose(full.g, _expected_g(full, 1.0), atol=1e-6)
    assert torch.equal(full.g, late.g)
    # the tangent term is really there once on: it changes g by a sizeable amount
    assert (full.g - start.g).norm() > 0.1 * start.g.norm() > 0
    norms = full.g.flatten(1).norm(dim=1)[:, None, None]
    assert torch.allclose(full.g_hat, full.g / (norms + 0.1))


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_flag_restored(tiny_flux, enabled):
    teacher, student = make_models(tiny_flux)
    if enabled:
        student.transformer.enable_gradient_checkpointing()
    seen = []  # (carries a tangent, grad enabled, checkpointing flag) for every student transformer call
    student.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(
            (carries_tangent(kwargs["hidden_states"]), torch.is_grad_enabled(), m.gradient_checkpointing)
        ),
        with_kwargs=True,
    )
    terms = loss_terms(student, teacher)
    terms.loss.backward()
    assert student.transformer.gradient_checkpointing is enabled
    assert seen == [(True, False, False), (False, True, enabled)]  # JVP: off; the forward with grad: as before


def test_random_draws_depend_only_on_the_generator(tiny_flux):
    teacher, student = make_models(tiny_flux)
    torch.manual_seed(123)
    a = loss_terms(student, teacher, seed=5)
    torch.manual_seed(456)  # the global RNG plays no part
    b = loss_terms(student, teacher, seed=5)
    c = loss_terms(student, teacher, seed=6)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t) and torch.equal(a.guidance, b.guidance)
    assert not torch.allclose(a.t, c.t)
    # the draws: sigma = exp(P_mean + P_std n), t = atan(sigma / sigma_d), g from the list, eps standard normal
    config = SCMConfig(sigma_data=0.6, logit_mean=0.2, logit_std=1.6, guidance_scales=(4.0, 4.5, 5.0))
    draws = sample_scm_draws((4096, 1, 1), config, torch.Generator().manual_seed(0))
    log_sigma = torch.log(0.6 * torch.tan(draws.t))  # t = atan(sigma / sigma_d) with the configured sigma_d
    assert abs(log_sigma.mean() - 0.2) < 0.1 and abs(log_sigma.std() - 1.6) < 0.1
    assert set(draws.guidance.tolist()) == {4.0, 4.5, 5.0} and abs(draws.eps.std() - 1) < 0.05
    assert draws.t.dtype == draws.eps.dtype == torch.float32 and 0 < draws.t.min() and draws.t.max() < torch.pi / 2


def test_time_math_stays_fp32_with_a_bf16_student(tiny_flux):
    teacher, student = make_models(tiny_flux, dtype=torch.bfloat16)
    assert student.logvar_linear.weight.dtype == torch.bfloat16
    x0_bar, cond, ids = batch(3, torch.bfloat16)
    config = SCMConfig(tangent_warmup_steps=0)
    terms = scm_loss_terms(student, teacher, x0_bar, cond, ids, 0, config, torch.Generator().manual_seed(0))
    for name in ("loss", "t", "x_t", "F_pre", "F_dot", "F_theta", "logvar", "g", "g_hat", "weight"):
        assert getattr(terms, name).dtype == torch.float32, name
    assert torch.isfinite(terms.loss) and all(torch.isfinite(v) and v.dtype == torch.float32 for v in terms.logs.values())
    # the angle is the exact fp32 draw, not a bf16-rounded one
    draws = sample_scm_draws(x0_bar.shape, config, torch.Generator().manual_seed(0))
    assert torch.equal(terms.t, draws.t) and not torch.equal(terms.t, terms.t.bfloat16().float())
    terms.loss.backward()
    assert student.logvar_linear.weight.grad is not None
    loss, logs = scm_loss(student, teacher, x0_bar, cond, ids, 0, config, torch.Generator().manual_seed(0))
    assert torch.equal(loss, terms.loss)
    assert set(logs) == {"loss_sCM", "l2_loss", "g_norm", "mean_weight", "logvar", "t_mean"}


def test_wrapped_student_is_used_for_the_forward_with_grad(tiny_flux):
    """The training loop passes the DDP/DeepSpeed-wrapped module as `student_forward`; the JVP uses the plain one."""
    teacher, student = make_models(tiny_flux)

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, []

        def forward(self, *args, **kwargs):
            self.calls.append((torch.is_grad_enabled(), kwargs.get("return_logvar")))
            return self.module(*args, **kwargs)

    wrapped = Wrapper(student)
    x0_bar, cond, ids = batch(0)
    config = SCMConfig(tangent_warmup_steps=400)
    loss, _ = scm_loss(student, teacher, x0_bar, cond, ids, 100, config, torch.Generator().manual_seed(0), wrapped)
    assert wrapped.calls == [(True, True)]
    assert torch.equal(loss, loss_terms(student, teacher, step=100, seed=0).loss)
