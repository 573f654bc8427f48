"""Few-step samplers as small pure functions of (model function, noise, schedule), in fp32 (METHODS 5).

Model functions take and return fp32 tensors; schedules come from `model.conventions`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor


def sample_euler(velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, times: Tensor) -> Tensor:
    """Flow-match Euler from t_0 = 1 to t_N = 0: z <- z + (t_{j+1} - t_j) v(z, t_j)."""
    z = noise.float()
    for t, t_next in zip(times[:-1], times[1:]):
        z = z + (t_next - t) * velocity(z, t)
    return z


def sample_meanflow(
    average_velocity: Callable[[Tensor, Tensor, Tensor], Tensor], noise: Tensor, times: Tensor
) -> Tensor:
    """MeanFlow: z_r = z_t - (t - r) u(z_t, r, t) with r = the next time (METHODS 5.2)."""
    z = noise.float()
    for t, r in zip(times[:-1], times[1:]):
        z = z - (t - r) * average_velocity(z, r, t)
    return z


def sample_scm(
    trigflow: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    angles: Tensor,
    fresh_noise: Callable[[int], Tensor],
    sigma_data: float = 0.5,
) -> Tensor:
    """sCM denoise-then-renoise (METHODS 5.1); returns the final x0 / sigma_d (the normalised latent).

    `trigflow(x_tilde, s)` is the TrigFlow output F at angle s for x_tilde = x_s / sigma_d; `fresh_noise(i)`
    draws the unit Gaussian noise used to re-noise after step i.
    """
    x = sigma_data * noise.float()
    x0 = x
    for i, (s, s_next) in enumerate(zip(angles[:-1], angles[1:])):
        x0 = torch.cos(s) * x - torch.sin(s) * sigma_data * trigflow(x / sigma_data, s)
        if s_next > 0:
            x = torch.cos(s_next) * x0 + torch.sin(s_next) * sigma_data * fresh_noise(i)
    return x0 / sigma_data


NOISE_TYPES = ("fresh", "fixed", "ddim")


def sid_times(num_steps: int, train_steps: int | None = None, init_time: float = 1.0,
              shift_mu: float | None = None) -> Tensor:
    """SiD generator times: the first `num_steps` of t_i = t_init (1 - i / K), K = `train_steps` (the K the
    generator was trained with: every prefix of its schedule is a trained few-step sampler) or `num_steps`;
    with `shift_mu`, shifted like FLUX's schedule (e^mu / (e^mu + 1/t - 1))."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    K = max(train_steps or num_steps, num_steps)
    times = init_time * (1 - torch.arange(K, dtype=torch.float64) / K)
    if shift_mu is not None:
        times = math.exp(shift_mu) / (math.exp(shift_mu) + 1 / times - 1)
    return times[:num_steps].float()


def sample_sid(
    x0_of: Callable[[Tensor, Tensor, int], Tensor],
    noise: Tensor,
    times: Tensor,
    noise_type: str = "fresh",
    fresh_noise: Callable[[int], Tensor] | None = None,
) -> Tensor:
    """SiD's few-step generator (METHODS 7.2); returns the last x0 prediction.

    From x0^(-1) = 0: x_{t_i} = (1 - t_i) x0^(i-1) + t_i n_i and x0^(i) = x0_of(x_{t_i}, t_i, i). The noise n_0 is
    `noise`; afterwards "fresh" draws `fresh_noise(i)`, "fixed" reuses `noise`, and "ddim" takes the noise the
    previous step implies, (x_{t_{i-1}} - (1 - t_{i-1}) x0^(i-1)) / t_{i-1}, detached.
    """
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type {noise_type!r}: choose one of {', '.join(NOISE_TYPES)}")
    n = noise.float()
    x0 = torch.zeros_like(n)
    x = t_prev = None
    for i, t in enumerate(times):
        if i > 0 and noise_type == "fresh":
            n = fresh_noise(i).float()
        elif i > 0 and noise_type == "ddim":
            n = ((x - (1 - t_prev) * x0) / t_prev).detach()
        x = (1 - t) * x0 + t * n
        x0 = x0_of(x, t, i)
        t_prev = t
    return x0
