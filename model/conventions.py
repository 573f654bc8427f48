"""Time and parameterisation conventions, in one place (METHODS sections 1-5). All math here runs in fp32.

Flow time: x_tau = (1 - tau) * x0 + tau * eps, with tau = 1 pure noise and velocity v = eps - x0.
TrigFlow (sCM): x_t = cos(t) * x0 + sin(t) * z with z = sigma_d * eps and t in [0, pi/2]; x0 here lives in
"sigma_d space" (x0 = sigma_d * normalised latent). Both describe the same path: tan(t) = tau / (1 - tau).
"""

from __future__ import annotations

import math

import torch

SIGMA_DATA = 0.5
# The reference's first sCM angle: slightly above pi/2 so that the first step sees pure noise.
SCM_MAX_ANGLE = 1.57080
SCM_INTERMEDIATE_ANGLE_2STEP = 1.3


def _f32(x: torch.Tensor | float) -> torch.Tensor:
    return x.float() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float32)


def flow_interpolate(x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """x_tau = (1 - tau) x0 + tau eps."""
    return (1 - tau) * x0 + tau * eps


def flow_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d x_tau / d tau = eps - x0."""
    return eps - x0


def x0_from_velocity(x_tau: torch.Tensor, tau: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0 = x_tau - tau v."""
    return x_tau - tau * v


def eps_from_velocity(x_tau: torch.Tensor, tau: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eps = x_tau + (1 - tau) v."""
    return x_tau + (1 - tau) * v


def trig_to_flow(t: torch.Tensor) -> torch.Tensor:
    """tau(t) = sin t / (sin t + cos t)."""
    t = _f32(t)
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def flow_to_trig(tau: torch.Tensor) -> torch.Tensor:
    """t(tau) = atan2(tau, 1 - tau), the inverse of trig_to_flow on [0, 1]."""
    tau = _f32(tau)
    return torch.atan2(tau, 1 - tau)


def sigma_to_trig(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """sCM's noise level sigma (EDM scale) to the TrigFlow angle: t = atan(sigma / sigma_d)."""
    return torch.atan(_f32(sigma) / sigma_data)


def trigflow_to_flow_input(x_tilde: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map x_tilde = x_t / sigma_d at angle t to the flow model's input (x_tau, tau).

    With x_tilde = cos t x0 + sin t eps, x_tau = x_tilde / (sin t + cos t) = (1 - tau) x0 + tau eps.
    """
    t = _f32(t)
    return x_tilde.float() / (torch.sin(t) + torch.cos(t)), trig_to_flow(t)


def trigflow_from_flow_velocity(x_tilde: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """TrigFlow output F from a flow velocity v (METHODS 3.2): F = ((cos t - sin t) x_tilde + v) / (sin t + cos t).

    For the exact v = eps - x0 this is cos t eps - sin t x0 = (d x_t / dt) / sigma_d.
    """
    t = _f32(t)
    cos, sin = torch.cos(t), torch.sin(t)
    return ((cos - sin) * x_tilde.float() + v.float()) / (sin + cos)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift: mu grows linearly in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def shift_times(tau: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's exponential time shift: e^mu / (e^mu + 1/tau - 1), applied to flow times in (0, 1]."""
    tau = _f32(tau)
    return math.exp(mu) / (math.exp(mu) + 1 / tau - 1)


def flux_times(num_steps: int, image_seq_len: int, scheduler_config: dict | None = None) -> torch.Tensor:
    """Flow times [t_0 = 1, ..., t_{N-1}, 0] of FLUX's sampler: linspace(1, 1/N, N), shifted by mu(L), then 0.

    `scheduler_config` is the pipeline's FlowMatchEulerDiscreteScheduler config (its shift parameters).
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    cfg = dict(scheduler_config or {})
    mu = flux_mu(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = shift_times(base, mu) if cfg.get("use_dynamic_shifting", True) else base
    return torch.cat([shifted.float(), torch.zeros(1)])


def scm_angles(
    num_steps: int,
    max_angle: float = SCM_MAX_ANGLE,
    intermediate_angle: float | None = None,
) -> torch.Tensor:
    """TrigFlow angles [s_0, ..., s_N = 0] of the sCM sampler (METHODS 5.1).

    Two steps default to the reference's intermediate angle 1.3; otherwise the angles are evenly spaced.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if num_steps == 2:
        mid = SCM_INTERMEDIATE_ANGLE_2STEP if intermediate_angle is None else intermediate_angle
        return torch.tensor([max_angle, mid, 0.0], dtype=torch.float32)
    if intermediate_angle is not None:
        raise ValueError("an intermediate angle only applies to 2-step sCM sampling")
    return torch.linspace(max_angle, 0.0, num_steps + 1, dtype=torch.float64).float()
