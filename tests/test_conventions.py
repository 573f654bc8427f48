import math

import pytest
import torch

from model import conventions as C


def test_trig_flow_round_trip_and_endpoints():
    tau = torch.linspace(0, 1, 101)
    assert torch.allclose(C.trig_to_flow(C.flow_to_trig(tau)), tau, atol=1e-6)
    assert C.flow_to_trig(torch.tensor(0.0)).item() == 0.0
    assert C.flow_to_trig(torch.tensor(1.0)).item() == pytest.approx(math.pi / 2)
    assert C.trig_to_flow(torch.tensor(1.3)).item() == pytest.approx(0.783, abs=1e-3)  # METHODS 5.1


def test_trigflow_input_is_the_flow_interpolant():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    t = torch.rand(3, 1, generator=g) * (math.pi / 2)
    x_tilde = torch.cos(t) * x0 + torch.sin(t) * eps
    x_flow, tau = C.trigflow_to_flow_input(x_tilde, t)
    assert torch.allclose(x_flow, C.flow_interpolate(x0, eps, tau), atol=1e-6)


def test_trigflow_output_of_exact_velocity_is_the_trigflow_derivative():
    """METHODS 9: with v = eps - x0, F = cos t eps - sin t x0 (to 1e-5 in fp32)."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    t = torch.rand(4, 1, generator=g) * 1.5 + 0.03
    x_tilde = torch.cos(t) * x0 + torch.sin(t) * eps
    F = C.trigflow_from_flow_velocity(x_tilde, t, C.flow_velocity(x0, eps))
    assert torch.allclose(F, torch.cos(t) * eps - torch.sin(t) * x0, atol=1e-5)


def test_velocity_conversions():
    g = torch.Generator().manual_seed(2)
    x0, eps, tau = torch.randn(5, generator=g), torch.randn(5, generator=g), torch.rand(5, generator=g)
    x = C.flow_interpolate(x0, eps, tau)
    v = C.flow_velocity(x0, eps)
    assert torch.allclose(C.x0_from_velocity(x, tau, v), x0, atol=1e-6)
    assert torch.allclose(C.eps_from_velocity(x, tau, v), eps, atol=1e-6)


def test_sigma_to_trig_uses_sigma_data():
    assert C.sigma_to_trig(torch.tensor(0.5)).item() == pytest.approx(math.pi / 4)
    assert C.sigma_to_trig(torch.tensor(1.0), sigma_data=1.0).item() == pytest.approx(math.pi / 4)


@pytest.mark.parametrize(
    "resolution,steps,expected",
    [
        (512, 4, [1, 0.849, 0.653, 0.385, 0]),  # METHODS 5.2 table
        (1024, 4, [1, 0.905, 0.760, 0.513, 0]),
    ],
)
def test_flux_times_reproduce_the_reference_table(resolution, steps, expected):
    tokens = (resolution // 16) ** 2
    times = C.flux_times(steps, tokens)
    assert times.dtype == torch.float32
    assert times.tolist() == pytest.approx(expected, abs=1e-3)


def test_flux_mu_endpoints():
    assert C.flux_mu(256) == pytest.approx(0.5)
    assert C.flux_mu(4096) == pytest.approx(1.15)
    assert C.flux_mu(1024) == pytest.approx(0.63, abs=1e-3)


def test_flux_times_match_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    import numpy as np

    steps, tokens = 28, 1024
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=C.flux_mu(tokens))
    assert torch.allclose(C.flux_times(steps, tokens, dict(sched.config)), sched.sigmas.float(), atol=1e-6)


def test_scm_angles_reproduce_the_reference():
    assert C.scm_angles(1).tolist() == pytest.approx([1.5708, 0.0])
    assert C.scm_angles(2).tolist() == pytest.approx([1.5708, 1.3, 0.0])
    assert C.scm_angles(4).tolist() == pytest.approx([1.5708, 1.1781, 0.7854, 0.3927, 0.0], abs=1e-4)
    taus = C.trig_to_flow(C.scm_angles(4)[:-1]).tolist()
    assert taus == pytest.approx([1.0, 0.707, 0.5, 0.293], abs=1e-3)
    with pytest.raises(ValueError, match="2-step"):
        C.scm_angles(4, intermediate_angle=1.0)
    with pytest.raises(ValueError):
        C.scm_angles(0)
