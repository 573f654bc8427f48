"""Samplers and pipelines against closed-form oracles (METHODS 9)."""

import pytest
import torch
from diffusers import ModelMixin

from model.conventions import flux_times, scm_angles
from model.latents import pack_latents, unpack_latents
from model.pipeline import FluxEulerPipeline, FluxMeanFlowPipeline, FluxSCMPipeline, draw_noise
from model.samplers import sample_euler, sample_meanflow, sample_scm

MEAN, STD = 0.3, 0.6  # Gaussian toy data: every latent entry ~ N(MEAN, STD^2)


def gaussian_flow_map(z, t, r):
    """Exact PF-ODE map from time t to r for data N(MEAN, STD^2) and the path (1 - t) x0 + t eps."""
    def sigma(tau):
        return torch.sqrt((1 - tau) ** 2 * STD**2 + tau**2)

    return (1 - r) * MEAN + sigma(r) / sigma(t) * (z - (1 - t) * MEAN)


def gaussian_average_velocity(z, r, t):
    return (z - gaussian_flow_map(z, t, r)) / (t - r)


def gaussian_velocity(z, t):
    """Instantaneous velocity: derivative of the flow map at r = t."""
    def sigma(tau):
        return torch.sqrt((1 - tau) ** 2 * STD**2 + tau**2)

    dsigma = (t - (1 - t) * STD**2) / sigma(t)
    return -MEAN + dsigma / sigma(t) * (z - (1 - t) * MEAN)


class OracleTransformer(ModelMixin):
    """Stands in for the FLUX transformer: returns an oracle computed from its packed input and time."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and a dtype
        self.calls = []

    def forward(self, hidden_states, timestep, guidance, timestep2=None, return_dict=False, **_):
        self.calls.append((timestep.clone(), None if timestep2 is None else timestep2.clone()))
        return (self.fn(hidden_states.float(), timestep.float().view(-1, 1, 1),
                        None if timestep2 is None else timestep2.float().view(-1, 1, 1)),)


def make_pipeline(cls, tiny_flux, oracle):
    pipe = cls.from_pretrained(tiny_flux, transformer=OracleTransformer(oracle))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_noise(seed, batch, h=8, w=8):
    return pack_latents(draw_noise(torch.Generator().manual_seed(seed), batch, (16, h, w)))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_pipeline_with_oracle_velocity_returns_x0_exactly(tiny_flux, steps):
    target = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    packed_target = pack_latents(target)

    def oracle(x_flow, tau, _):  # v = eps - x0 = (x_tau - x0) / tau for the one data point x0
        return (x_flow - packed_target) / tau

    pipe = make_pipeline(FluxSCMPipeline, tiny_flux, oracle)
    out = pipe(prompt=["a", "b"], height=64, width=64, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.allclose(out, target, atol=1e-5)
    taus = [c[0][0].item() for c in pipe.transformer.calls]
    expected = torch.sin(scm_angles(steps)[:-1]) / (torch.sin(scm_angles(steps)[:-1]) + torch.cos(scm_angles(steps)[:-1]))
    assert taus == pytest.approx(expected.tolist(), abs=1e-6)


def test_scm_sampler_one_step_is_exact_and_renoises_with_fresh_noise():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    sd = 0.5

    def trigflow(x_tilde, s):  # exact F = cos s eps - sin s x0 given the one data point
        eps = (x_tilde - torch.cos(s) * x0) / torch.sin(s)
        return torch.cos(s) * eps - torch.sin(s) * x0

    drawn = []
    fresh = lambda i: drawn.append(i) or torch.randn(3, 10, generator=g)  # noqa: E731
    assert torch.allclose(sample_scm(trigflow, noise, scm_angles(1), fresh, sd), x0, atol=1e-5)
    assert drawn == []  # no re-noising after the last step
    assert torch.allclose(sample_scm(trigflow, noise, scm_angles(4), fresh, sd), x0, atol=1e-5)
    assert drawn == [0, 1, 2]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_meanflow_pipeline_is_exact_with_oracle_average_velocity(tiny_flux, steps):
    def oracle(z, t, delta):
        return gaussian_average_velocity(z, t - delta, t)

    pipe = make_pipeline(FluxMeanFlowPipeline, tiny_flux, oracle)
    out = pipe(prompt="a", height=64, width=64, num_inference_steps=steps, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    expected = unpack_latents(MEAN + STD * initial_noise(3, 2), 8, 8)  # the exact map of the initial noise
    assert torch.allclose(out, expected, atol=1e-5)
    times = flux_times(steps, 16)
    assert [c[0][0].item() for c in pipe.transformer.calls] == pytest.approx(times[:-1].tolist())
    assert [c[1][0].item() for c in pipe.transformer.calls] == pytest.approx((times[:-1] - times[1:]).tolist())


def test_meanflow_sampler_is_exact_for_any_schedule():
    noise = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    for times in [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.9, 0.3, 0.0])]:
        assert torch.allclose(sample_meanflow(gaussian_average_velocity, noise, times), MEAN + STD * noise, atol=1e-5)


def test_euler_sampler_converges_to_the_exact_flow():
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    exact = MEAN + STD * noise
    errors = [(sample_euler(gaussian_velocity, noise, flux_times(n, 1024)) - exact).abs().max().item()
              for n in (1, 4, 28, 200, 2000)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 3e-3
    assert 5 < errors[-2] / errors[-1] < 20  # first order: 10x the steps, 10x less error


def test_euler_pipeline_matches_diffusers_flux_pipeline(tiny_flux):
    from diffusers import FluxPipeline

    from model.loading import load_transformer

    stock = FluxPipeline.from_pretrained(tiny_flux)
    ours = FluxEulerPipeline.from_pretrained(tiny_flux, transformer=load_transformer(str(tiny_flux)))
    kw = dict(height=64, width=64, num_inference_steps=28, guidance_scale=3.5, max_sequence_length=32,
              output_type="np")
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    a = stock("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
    b = ours("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == b.shape == (1, 64, 64, 3)
    assert abs(a - b).max() < 1e-4


def test_per_image_generators_make_images_independent_of_the_batch(tiny_flux):
    from model.loading import load_transformer

    pipe = FluxSCMPipeline.from_pretrained(tiny_flux, transformer=load_transformer(str(tiny_flux), time_input_scale=1.0))
    pipe.set_progress_bar_config(disable=True)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="latent",
              transformer_batch_size=1)
    both = pipe(prompt=["a red circle", "a blue square"], generator=gens(10, 11), **kw).images
    second = pipe(prompt=["a blue square"], generator=gens(11), **kw).images
    assert torch.equal(both[1:], second)
    with pytest.raises(ValueError, match="one per image"):
        pipe(prompt=["a"], generator=gens(1, 2), **kw)
