"""sCM: continuous-time consistency distillation in TrigFlow (METHODS 3), with an explicit config.

- `SCMConfig`: every hyper-parameter of the loss (no process-wide args; METHODS 8.1).
- `TrigFlowModel`: F(x_tilde, t, g, c) around a x1 flow-velocity FLUX transformer, by composition (METHODS 3.2,
  8.15), with the student's optional adaptive log-variance head.
- `sample_scm_draws`: the random inputs of one batch (eps, t, g), all from one explicit generator (METHODS 8.6).
- `scm_tangent`: F and its total derivative along the teacher PF-ODE via torch.func.jvp (METHODS 3.4, 3.6).
- `scm_loss_terms` / `scm_loss`: teacher target, JVP, student forward, normalised tangent, loss (METHODS 3.3-3.5).

Shapes: latents are packed [B, L, 64]; t, g are [B]; per-sample scalars broadcast as [B, 1, 1]. All time math
(t, sin/cos, tau, the conversions, the tangent g, its norm, the weight w) runs in fp32 (fp64 if the inputs are
fp64) whatever the network dtype (METHODS 8.7); only the transformer call runs in its own dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from common.cli import UsageError

from .conventions import SIGMA_DATA, sigma_to_trig
from .text import PromptEmbeds
from .transformer import flux_velocity


@dataclass
class SCMConfig:
    """Hyper-parameters of the sCM loss (METHODS 3.1, 3.5, 1.6).

    - sigma_data: sigma_d; x0 = sigma_d * normalised latent and z = sigma_d * eps.
    - logit_mean, logit_std: P_mean, P_std of the log-normal sigma = exp(P_mean + P_std n), n ~ N(0, 1); the
      reference's CLI names. Its defaults are 0.0 / 1.0, its shell script uses 0.2 / 1.6.
    - guidance_scales: per-sample guidance g is drawn uniformly from this list, the same for teacher and student.
    - tangent_warmup_steps: H in r = min(1, step / H); 0 means no warmup (r = 1).
    - tangent_norm_eps: c in g_hat = g / (||g|| + c).
    - scm_lambda: lambda, the loss multiplier.
    """

    sigma_data: float = SIGMA_DATA
    logit_mean: float = 0.0
    logit_std: float = 1.0
    guidance_scales: tuple[float, ...] = (4.0, 4.5, 5.0)
    tangent_warmup_steps: int = 4000
    tangent_norm_eps: float = 0.1
    scm_lambda: float = 1.0

    def __post_init__(self):
        self.guidance_scales = tuple(float(g) for g in self.guidance_scales)
        if not self.guidance_scales:
            raise UsageError("SCMConfig.guidance_scales must hold at least one guidance scale")
        if self.sigma_data <= 0 or self.logit_std < 0 or self.tangent_norm_eps < 0 or self.tangent_warmup_steps < 0:
            raise UsageError(f"invalid SCMConfig: {self}")

    def warmup_ratio(self, step: int) -> float:
        """r = min(1, step / H) (METHODS 3.5.2); r = 1 without warmup (H = 0)."""
        if self.tangent_warmup_steps == 0:
            return 1.0
        return min(1.0, max(0, step) / self.tangent_warmup_steps)


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (finite-difference tests): time math is never done below fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B] (or [B, 1, 1]) -> [B, 1, 1] in `dtype`."""
    return t.to(dtype).reshape(-1, 1, 1)


class TrigFlowModel(torch.nn.Module):
    """F(x_tilde, t, g, c) of a x1 flow-velocity transformer v(x, tau, g, c) (METHODS 3.2).

    With x_tilde = x_t / sigma_d at the TrigFlow angle t: tau = sin t / (sin t + cos t), x_flow = x_tilde /
    (sin t + cos t), v = v(x_flow, tau, g, c) and F = [(cos t - sin t) x_tilde + v] / (sin t + cos t), the same
    conversion as `conventions.trigflow_to_flow_input` / `trigflow_from_flow_velocity`, here done in fp32 (fp64
    for fp64 inputs) so that tangents pass through it unrounded.

    The transformer is a registered submodule (`.transformer`, state-dict prefix "net."); nothing of it is
    copied or patched. The optional log-variance head (students only) is Linear(D, 1) with Xavier-uniform weight
    and zero bias, fed the conditioning vector temb = embed_conditioning(t, g, pooled) where t is the TrigFlow
    ANGLE, not tau, exactly as the reference does (METHODS 3.2, 8.15); the backbone itself sees tau.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        logvar_head: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.net = transformer
        self.logvar_linear: torch.nn.Linear | None = None
        if logvar_head:
            weight = next(transformer.parameters())
            head = torch.nn.Linear(transformer.inner_dim, 1, device=weight.device, dtype=torch.float32)
            torch.nn.init.xavier_uniform_(head.weight, generator=generator)
            torch.nn.init.zeros_(head.bias)
            self.logvar_linear = head.to(weight.dtype)

    @property
    def transformer(self) -> torch.nn.Module:
        """The wrapped flow-velocity transformer (what checkpoints and samplers use)."""
        return self.net

    @contextmanager
    def gradient_checkpointing_disabled(self):
        """Clear every `gradient_checkpointing` flag of the transformer, and restore each one exactly afterwards.

        Non-reentrant checkpointing is incompatible with torch.func.jvp (METHODS 3.6). Flags that were off stay off
        (the reference forces them on after its JVPs: METHODS 8.13).
        """
        flagged = [m for m in self.net.modules() if hasattr(m, "gradient_checkpointing")]
        previous = [m.gradient_checkpointing for m in flagged]
        try:
            for m in flagged:
                m.gradient_checkpointing = False
            yield
        finally:
            for m, flag in zip(flagged, previous):
                m.gradient_checkpointing = flag

    def forward(
        self,
        x_tilde: torch.Tensor,
        t: torch.Tensor,
        guidance: torch.Tensor,
        cond: PromptEmbeds,
        img_ids: torch.Tensor,
        return_logvar: bool = False,
    ):
        """F [B, L, 64] in fp32 (or fp64), and with `return_logvar` also logvar [B, 1, 1] (fp32 or fp64).

        x_tilde = x_t / sigma_d packed [B, L, 64]; t the angle [B] or [B, 1, 1]; guidance [B].
        """
        dtype = _time_dtype(x_tilde)
        t3 = _per_sample(t, dtype)
        cos, sin = torch.cos(t3), torch.sin(t3)
        x_tilde = x_tilde.to(dtype)
        x_flow, tau = x_tilde / (sin + cos), sin / (sin + cos)  # conventions.trigflow_to_flow_input
        v = flux_velocity(self.net, x_flow, tau.reshape(-1), guidance, cond, img_ids)
        F = ((cos - sin) * x_tilde + v.to(dtype)) / (sin + cos)  # conventions.trigflow_from_flow_velocity
        if not return_logvar:
            return F
        if self.logvar_linear is None:
            raise ValueError("this TrigFlowModel has no log-variance head: build it with logvar_head=True")
        net_dtype = next(self.net.parameters()).dtype
        temb = self.net.embed_conditioning(t3.reshape(-1), guidance, cond.pooled_prompt_embeds.to(net_dtype))
        logvar = self.logvar_linear(temb.to(self.logvar_linear.weight.dtype))
        return F, logvar.to(dtype).reshape(-1, 1, 1)


@dataclass
class SCMDraws:
    """Random inputs of one batch: eps [B, L, 64], t [B] (angle), guidance [B]; fp32 on the target device."""

    eps: torch.Tensor
    t: torch.Tensor
    guidance: torch.Tensor


def sample_scm_draws(
    shape: torch.Size | tuple[int, ...],
    config: SCMConfig,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> SCMDraws:
    """eps ~ N(0, I); sigma = exp(P_mean + P_std n); t = atan(sigma / sigma_d); g ~ U(guidance_scales) (METHODS 3.1).

    Everything is drawn on the CPU in fp32 from `generator` only (this rank's stream), then moved to `device`.
    """
    batch = shape[0]
    eps = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    n = torch.randn(batch, generator=generator, dtype=torch.float32)
    sigma = torch.exp(config.logit_mean + config.logit_std * n)
    t = sigma_to_trig(sigma, config.sigma_data)
    choice = torch.randint(len(config.guidance_scales), (batch,), generator=generator)
    guidance = torch.tensor(config.guidance_scales, dtype=torch.float32)[choice]
    return SCMDraws(eps.to(device), t.to(device), guidance.to(device))


def scm_tangent(
    student: TrigFlowModel,
    x_tilde: torch.Tensor,
    t: torch.Tensor,
    F_pre: torch.Tensor,
    guidance: torch.Tensor,
    cond: PromptEmbeds,
    img_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, F_dot) = torch.func.jvp(F_theta(., .), (x_tilde, t), (cos t sin t F_pre, cos t sin t)) (METHODS 3.4).

    F_dot = cos t sin t dF_theta/dt is the total derivative along the teacher PF-ODE dx_t/dt = sigma_d F_pre.
    Runs under no_grad with gradient checkpointing disabled (flags restored afterwards; METHODS 3.6). The
    student's attention must support forward-mode AD (`model.attention.use_jvp_attention`).
    """
    dtype = _time_dtype(x_tilde)
    x_tilde, t = x_tilde.to(dtype), t.to(dtype).reshape(-1)
    cos_sin = torch.cos(t) * torch.sin(t)
    tangents = (_per_sample(cos_sin, dtype) * F_pre.to(dtype), cos_sin)

    def F_theta(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        return student(x, angle, guidance, cond, img_ids)

    with torch.no_grad(), student.gradient_checkpointing_disabled():
        return torch.func.jvp(F_theta, (x_tilde, t), tangents)


@dataclass
class SCMTerms:
    """Everything the sCM loss computed for one batch (for logging and tests). Per-sample scalars are [B, 1, 1]."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]
    t: torch.Tensor  # [B] angle, fp32
    guidance: torch.Tensor  # [B]
    x_t: torch.Tensor
    F_pre: torch.Tensor
    F_dot: torch.Tensor
    F_theta: torch.Tensor  # with grad
    logvar: torch.Tensor  # with grad
    g: torch.Tensor
    g_hat: torch.Tensor
    weight: torch.Tensor
    r: float


def scm_loss_terms(
    student: TrigFlowModel,
    teacher: TrigFlowModel,
    x0_bar: torch.Tensor,
    cond: PromptEmbeds,
    img_ids: torch.Tensor,
    step: int,
    config: SCMConfig,
    generator: torch.Generator,
    student_forward: Callable | None = None,
) -> SCMTerms:
    """The sCM loss of one batch (METHODS 3.1-3.5); x0_bar are normalised latents packed [B, L, 64] (no sigma_d).

    3.1  x0 = sigma_d x0_bar, z = sigma_d eps, t = atan(sigma / sigma_d), x_t = cos t x0 + sin t z
    3.3  F_pre = F_teacher(x_t / sigma_d, t, g)                                        (no grad)
    3.4  F_dot = jvp of F_theta along (cos t sin t F_pre, cos t sin t)                 (no grad)
    3.5  F_theta, l = F_theta(x_t / sigma_d, t, g) with grad, F_minus = sg(F_theta), r = min(1, step / H)
         g = -cos^2 t (sigma_d F_minus - sigma_d F_pre) - r (sin t cos t x_t + sigma_d F_dot)
         g_hat = g / (||g|| + c), w = 1 / (sigma_d tan t)
         L = lambda mean[(w / e^l) (F_theta - F_minus - g_hat)^2 + l]

    `student` is the plain TrigFlowModel (used for the JVP); `student_forward`, if given, is the same module as
    wrapped by DDP / DeepSpeed, called for the forward with grad so that the engine sees it. `step` is the optimizer
    step (for the warmup r); all randomness comes from `generator` (METHODS 8.6).
    """
    sd, dtype = config.sigma_data, _time_dtype(x0_bar)
    draws = sample_scm_draws(x0_bar.shape, config, generator, x0_bar.device)
    t = draws.t.to(dtype)
    cos, sin = torch.cos(_per_sample(t, dtype)), torch.sin(_per_sample(t, dtype))
    x_t = cos * sd * x0_bar.to(dtype) + sin * sd * draws.eps.to(dtype)

    with torch.no_grad():
        F_pre = teacher(x_t / sd, t, draws.guidance, cond, img_ids).to(dtype)
    _, F_dot = scm_tangent(student, x_t / sd, t, F_pre, draws.guidance, cond, img_ids)
    F_theta, logvar = (student_forward or student)(x_t / sd, t, draws.guidance, cond, img_ids, return_logvar=True)
    F_minus = F_theta.detach()

    r = config.warmup_ratio(step)
    g = -cos**2 * (sd * F_minus - sd * F_pre) - r * (sin * cos * x_t + sd * F_dot.to(dtype))
    g_norm = g.flatten(1).norm(dim=1).reshape(-1, 1, 1)
    g_hat = g / (g_norm + config.tangent_norm_eps)
    weight = 1 / (sd * torch.tan(_per_sample(t, dtype)))
    loss = config.scm_lambda * ((weight / logvar.exp()) * (F_theta - F_minus - g_hat) ** 2 + logvar).mean()

    logs = {
        "loss_sCM": loss.detach(),
        "l2_loss": g_hat.square().mean(),
        "g_norm": g_norm.mean(),
        "mean_weight": weight.mean(),
        "logvar": logvar.detach().mean(),
        "t_mean": t.mean(),
    }
    return SCMTerms(loss, logs, t, draws.guidance, x_t, F_pre, F_dot, F_theta, logvar, g, g_hat, weight, r)


def scm_loss(
    student: TrigFlowModel,
    teacher: TrigFlowModel,
    x0_bar: torch.Tensor,
    cond: PromptEmbeds,
    img_ids: torch.Tensor,
    step: int,
    config: SCMConfig,
    generator: torch.Generator,
    student_forward: Callable | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, logs) of `scm_loss_terms`: the training loop's entry point. Logs are detached fp32 0-dim tensors."""
    terms = scm_loss_terms(student, teacher, x0_bar, cond, img_ids, step, config, generator, student_forward)
    return terms.loss, terms.logs


__all__ = [
    "SCMConfig",
    "SCMDraws",
    "SCMTerms",
    "TrigFlowModel",
    "sample_scm_draws",
    "scm_loss",
    "scm_loss_terms",
    "scm_tangent",
]
