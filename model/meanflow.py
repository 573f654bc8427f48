"""MeanFlow distillation loss (METHODS 4), with an explicit config instead of process-wide args (METHODS 8.1).

The student u_theta(z, r, t) predicts the average velocity over [r, t] of the flow z_t = (1 - t) x0 + t eps
(t = 1 is noise). It is a dual-timestep FluxTransformer fed timestep = t and timestep2 = t - r. MeanFlow's
identity u(z_t, r, t) = v(z_t, t) - (t - r) du/dt, with du/dt the total derivative along the flow,
becomes a regression target once the instantaneous velocity v is taken from the teacher (METHODS 4.3-4.4):

    u_tgt = v_base - (t - r) du/dt,   du/dt = jvp(u_theta, (z_t, r, t), (v_tan, 0, 1)),
    v_base = v_T (teacher velocity), or on CFG samples v_tilde = omega v_T + kappa u_c + (1 - omega - kappa) u_u.

Everything works on packed latents [B, L, 64]. Time math and targets are fp32 (METHODS 8.7), whatever the model
dtype. All randomness is drawn from the caller's torch.Generator, so each rank can seed its own (METHODS 8.6).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from common.cli import UsageError

from .conventions import flow_interpolate, flow_velocity
from .text import PromptEmbeds
from .transformer import flux_velocity

TIME_SAMPLERS = ("logit_normal", "uniform")
WEIGHTINGS = ("adaptive", "uniform", "high_order")
JVP_TANGENTS = ("teacher", "data")
CFG_DELTAS = ("zero", "t_minus_r")


@dataclass
class MeanFlowConfig:
    """MeanFlow hyper-parameters; the defaults are the reference's CLI defaults (METHODS 1.6, 4).

    - Times (4.1): (r, t) sorted from two `time_sampler` draws (logit-normal(`time_mu`, `time_sigma`) or
      uniform); r = t with probability 1 - `ratio_r_not_equal_t` (0.25 by default, METHODS 8.14).
    - Conditioning (1.6): guidance g drawn uniformly from `guidance_scales`; with probability `cfg_prob` a
      sample's prompt is replaced by the negative prompt " " and the sample is marked unconditional.
    - CFG-MeanFlow (4.5): if `use_cfg_meanflow`, conditional samples with `cfg_min_t` <= t <= `cfg_max_t` use
      v_tilde = `cfg_omega` v_T + `cfg_kappa` u_c + (1 - omega - kappa) u_u as their velocity.
    - Weighting (4.6): w_b = 1 / sg(L_b + `adaptive_c`)^p, where L_b is the per-sample squared error summed
      over all elements, and
        "adaptive":   p = `adaptive_p` (reference; p = 1 makes each w_b L_b ~ 1),
        "high_order": p = 1 - `high_order_gamma`. MeanFlow (Geng et al. 2025, adaptive loss weighting) shows
                      that sg(w) ||Delta||^2 with w = 1/(||Delta||^2 + c)^(1 - gamma) has the gradient of
                      ||Delta||^(2 gamma) / gamma. We read the paper's "high-order loss (gamma = 2)" (METHODS 10)
                      as this gamma, i.e. p = -1 and w_b = sg(L_b + c): the loss behaves like L_b^2, so its
                      scale is the squared summed error (large at 512 px; Adam is insensitive to the scale,
                      gradient clipping is not). The other reading, adaptive_p = 2, is weighting="adaptive".
        "uniform":    w_b = 1.
    - Reference inconsistencies, as switches defaulting to the consistent choice:
        `jvp_tangent` (8.10): z-tangent of the JVP. "teacher": v_base (v_T, or v_tilde on CFG samples), the
            velocity the target is built on. "data" (reference): eps - x0 on non-CFG samples.
        `cfg_delta` (8.11): time gap at which u_c, u_u are evaluated. "zero": r = t (timestep2 = 0), as in
            the MeanFlow paper. "t_minus_r" (reference): the sample's own t - r.
    - `path_type`: only "linear". The teacher is a linear-path flow model, so its velocity is d z_t / dt of
      the linear interpolant; a cosine interpolant would feed it off-path inputs.
    """

    time_sampler: str = "logit_normal"
    time_mu: float = -0.4
    time_sigma: float = 1.0
    ratio_r_not_equal_t: float = 0.75
    weighting: str = "adaptive"
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    high_order_gamma: float = 2.0
    path_type: str = "linear"
    cfg_prob: float = 0.1
    guidance_scales: tuple[float, ...] = field(default=(4.0, 4.5, 5.0))
    use_cfg_meanflow: bool = False
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.0
    cfg_min_t: float = 0.0
    cfg_max_t: float = 1.0
    jvp_tangent: str = "teacher"
    cfg_delta: str = "zero"

    def __post_init__(self):
        self.guidance_scales = tuple(float(g) for g in self.guidance_scales)
        for name, allowed in [("time_sampler", TIME_SAMPLERS), ("weighting", WEIGHTINGS),
                              ("jvp_tangent", JVP_TANGENTS), ("cfg_delta", CFG_DELTAS), ("path_type", ("linear",))]:
            if getattr(self, name) not in allowed:
                raise UsageError(f"MeanFlowConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
        if not 0.0 <= self.ratio_r_not_equal_t <= 1.0 or not 0.0 <= self.cfg_prob <= 1.0:
            raise UsageError("ratio_r_not_equal_t and cfg_prob are probabilities: they must lie in [0, 1]")
        if not self.guidance_scales:
            raise UsageError("guidance_scales must hold at least one guidance scale")


# ----------------------------------------------------------------------------------------------- randomness


def sample_times(batch: int, generator: torch.Generator, config: MeanFlowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) in fp32 (METHODS 4.1): two draws sorted so r <= t, then r = t with prob. 1 - ratio_r_not_equal_t."""
    kw = dict(generator=generator, device=generator.device, dtype=torch.float32)
    if config.time_sampler == "uniform":
        draws = torch.rand(batch, 2, **kw)
    else:
        draws = torch.sigmoid(config.time_mu + config.time_sigma * torch.randn(batch, 2, **kw))
    r, t = draws.sort(dim=1).values.unbind(dim=1)
    r_equals_t = torch.rand(batch, **kw) < 1.0 - config.ratio_r_not_equal_t
    return torch.where(r_equals_t, t, r), t


@dataclass
class MeanFlowDraws:
    """The randomness of one batch: times r, t [B], noise eps [B, L, C], guidance g [B], label dropout [B]."""

    r: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    g: torch.Tensor
    dropped: torch.Tensor


def sample_draws(x0: torch.Tensor, generator: torch.Generator, config: MeanFlowConfig) -> MeanFlowDraws:
    """Draw, in this order, (r, t), eps, g and the dropout mask from `generator`; return them on x0's device."""
    batch, kw = x0.shape[0], dict(generator=generator, device=generator.device)
    r, t = sample_times(batch, generator, config)
    eps = torch.randn(x0.shape, dtype=torch.float32, **kw)
    g = torch.tensor(config.guidance_scales)[torch.randint(len(config.guidance_scales), (batch,), **kw).cpu()]
    dropped = torch.rand(batch, **kw) < config.cfg_prob
    return MeanFlowDraws(*(x.to(x0.device) for x in (r, t, eps, g, dropped)))


# ------------------------------------------------------------------------------------------ model evaluation


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside a DDP / DeepSpeed wrapper (their `.module`), or the model itself."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


@contextmanager
def gradient_checkpointing_disabled(model: torch.nn.Module):
    """Clear every `gradient_checkpointing` flag for the block and restore each one's previous value (METHODS 8.13)."""
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    saved = [m.gradient_checkpointing for m in flagged]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, value in zip(flagged, saved):
            m.gradient_checkpointing = value


def average_velocity(student, z, r, t, g, cond, img_ids) -> torch.Tensor:
    """u_theta(z, r, t): the dual-timestep student at timestep = t, timestep2 = t - r (METHODS 4.3)."""
    return flux_velocity(student, z, t, g, cond, img_ids, timestep2=t - r)


def average_velocity_jvp(student, z, r, t, z_tangent, g, cond, img_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt) with du/dt = z_tangent . d_z u + d_t u, the JVP along (dz, dr, dt) = (z_tangent, 0, 1) (METHODS 4.4).

    d_t acts through both time inputs (timestep = t and timestep2 = t - r). Runs under no_grad with gradient
    checkpointing off for the call (non-reentrant checkpointing has no forward-AD rule, METHODS 3.6).
    """
    def fn(z, r, t):
        return average_velocity(student, z, r, t, g, cond, img_ids)

    with torch.no_grad(), gradient_checkpointing_disabled(student):
        return torch.func.jvp(fn, (z, r, t), (z_tangent, torch.zeros_like(r), torch.ones_like(t)))


# -------------------------------------------------------------------------------------------- target and loss


def cfg_mix(v_T, u_c, u_u, omega: float, kappa: float) -> torch.Tensor:
    """v_tilde = omega v_T + kappa u_c + (1 - omega - kappa) u_u (METHODS 4.5)."""
    return omega * v_T + kappa * u_c + (1.0 - omega - kappa) * u_u


def cfg_mask(t: torch.Tensor, dropped: torch.Tensor, config: MeanFlowConfig) -> torch.Tensor:
    """m = use_cfg_meanflow & (cfg_min_t <= t <= cfg_max_t) & not dropped (METHODS 4.5)."""
    in_window = (t >= config.cfg_min_t) & (t <= config.cfg_max_t) & ~dropped
    return in_window if config.use_cfg_meanflow else torch.zeros_like(in_window)


def _per_sample(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t [B] shaped to broadcast against x [B, ...]."""
    return t.view(-1, *[1] * (x.ndim - 1))


@dataclass
class MeanFlowTarget:
    """u_tgt = v_base - (t - r) du/dt, with the pieces it is made of (all [B, L, C] except cfg_mask [B])."""

    u_tgt: torch.Tensor
    v_T: torch.Tensor
    v_base: torch.Tensor
    du_dt: torch.Tensor
    cfg_mask: torch.Tensor


@torch.no_grad()
def meanflow_target(student, teacher, z_t, v, r, t, g, cond, neg_cond, dropped, img_ids,
                    config: MeanFlowConfig) -> MeanFlowTarget:
    """The MeanFlow target of METHODS 4.3-4.5 (no grad). `cond` is the prompt after label dropout, `v` = eps - x0.

    No-grad student evaluations (u_c, u_u and the JVP) use the unwrapped transformer.
    """
    student = unwrap(student)
    v_T = flux_velocity(teacher, z_t, t, g, cond, img_ids)
    m = cfg_mask(t, dropped, config)
    v_base = v_T
    if m.any():
        idx = m.nonzero().squeeze(1)
        n = len(idx)
        if len(neg_cond) != 1:
            raise ValueError(f"neg_cond must hold the negative prompt once (batch 1), got batch {len(neg_cond)}")
        r_cfg = t[idx] if config.cfg_delta == "zero" else r[idx]  # timestep2 = 0, or the sample's t - r
        twice = lambda x: torch.cat([x, x])  # noqa: E731
        u_c, u_u = average_velocity(
            student, twice(z_t[idx]), twice(r_cfg), twice(t[idx]), twice(g[idx]),
            PromptEmbeds.cat([cond.index(idx), neg_cond.repeat_interleave(n)]), img_ids,
        ).chunk(2)
        v_base = v_T.index_put((idx,), cfg_mix(v_T[idx], u_c, u_u, config.cfg_omega, config.cfg_kappa))
    v_tan = v_base if config.jvp_tangent == "teacher" else torch.where(_per_sample(v, m), v_base, v)
    _, du_dt = average_velocity_jvp(student, z_t, r, t, v_tan, g, cond, img_ids)
    u_tgt = v_base - _per_sample(du_dt, t - r) * du_dt
    return MeanFlowTarget(u_tgt=u_tgt, v_T=v_T, v_base=v_base, du_dt=du_dt, cfg_mask=m)


def loss_weights(L_b: torch.Tensor, config: MeanFlowConfig) -> torch.Tensor:
    """w_b = 1 / sg(L_b + c)^p, p from `config.weighting` (see MeanFlowConfig; METHODS 4.6, 10)."""
    if config.weighting == "uniform":
        return torch.ones_like(L_b)
    p = config.adaptive_p if config.weighting == "adaptive" else 1.0 - config.high_order_gamma
    return 1.0 / (L_b.detach() + config.adaptive_c) ** p


def meanflow_loss(student, teacher, x0: torch.Tensor, cond: PromptEmbeds, neg_cond: PromptEmbeds,
                  img_ids: torch.Tensor, config: MeanFlowConfig, generator: torch.Generator):
    """MeanFlow distillation loss of one batch (METHODS 4): returns (loss, logs).

    x0: packed normalised latents [B, L, 64]; cond: the captions' PromptEmbeds; neg_cond: the " " prompt
    (batch 1); img_ids [L, 3]; generator: this rank's generator (all randomness). `student` may be wrapped
    (DDP / DeepSpeed): it is called as given for the forward with grad. Logs are detached 0-dim tensors
    (all-reduce them before logging): loss, loss_mean_ref = mean e^2, frac_r_eq_t, frac_cfg, frac_dropped.

        z_t = (1 - t) x0 + t eps,  v = eps - x0
        u_tgt = v_base - (t - r) du/dt                        (meanflow_target)
        e = u_theta(z_t, r, t) - sg(u_tgt),  L_b = sum e^2,  loss = mean_b w_b L_b
    """
    x0 = x0.float()
    d = sample_draws(x0, generator, config)
    r, t, g = d.r, d.t, d.g
    cond = cond.where(d.dropped, neg_cond)
    z_t = flow_interpolate(x0, d.eps, _per_sample(x0, t))
    v = flow_velocity(x0, d.eps)
    target = meanflow_target(student, teacher, z_t, v, r, t, g, cond, neg_cond, d.dropped, img_ids, config)
    u = average_velocity(student, z_t, r, t, g, cond, img_ids)
    e = u - target.u_tgt
    L_b = e.square().flatten(1).sum(dim=1)
    loss = (loss_weights(L_b, config) * L_b).mean()
    logs = {
        "loss": loss.detach(),
        "loss_mean_ref": e.detach().square().mean(),
        "frac_r_eq_t": (r == t).float().mean(),
        "frac_cfg": target.cfg_mask.float().mean(),
        "frac_dropped": d.dropped.float().mean(),
    }
    return loss, logs
