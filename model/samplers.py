"""Few-step samplers as small pure functions of (model function, noise, schedule), in fp32 (METHODS 5).

Model functions take and return fp32 tensors; schedules come from `model.conventions`.
"""

from __future__ import annotations

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
