"""The exact world (exactworld/): its closed-form teacher, its metrics, and convergence of every method's own loss.

The convergence tests train through `training.Trainer` with the unchanged losses of model/scm.py, model/meanflow.py
and model/sid.py (via the entry scripts' method classes), starting from a small velocity fit shared by the session,
and fail when a student stops reaching the teacher's ODE distribution in few steps.
"""

import math

import pytest
import torch

from exactworld.evaluate import References, headless_pipeline, sample, score_model
from exactworld.networks import ExactTeacher, ExactWorldNet
from exactworld.world import GaussianMixtureWorld, WorldConfig, evaluate_samples, mixture_velocity, sliced_w2, \
    sw_directions


@pytest.fixture(scope="module")
def world():
    return GaussianMixtureWorld(WorldConfig())


def test_velocity_equals_the_score_identity(world):
    """v = E[eps - x0 | x_t] = (-t grad log p_t(x) - x) / (1 - t), with log p_t the noised mixture's density
    (autograd, fp64), for prompts and the empty prompt, at small, middle and large t."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 3, 7, world.empty_id, 5, 1])
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    x0, _ = world.sample(ids, gen, torch.float64)
    x = ((1 - t)[:, None, None] * x0 + t[:, None, None] * torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    x.requires_grad_(True)
    score = torch.autograd.grad(world.log_density(x, t, ids).sum(), x)[0]
    expected = (-t[:, None, None] * score - x.detach()) / (1 - t)[:, None, None]
    torch.testing.assert_close(world.velocity(x.detach(), t, ids), expected, rtol=1e-9, atol=1e-9)


def test_guided_velocity_is_the_cfg_mix(world):
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([2, 4, world.empty_id])
    x = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.2, 0.6, 0.8], dtype=torch.float64)
    empty = torch.full_like(ids, world.empty_id)
    v_c, v_u = world.velocity(x, t, ids), world.velocity(x, t, empty)
    expected = v_u + 2.5 * (v_c - v_u)
    expected[2] = v_u[2]  # the empty prompt is never guided
    torch.testing.assert_close(world.velocity(x, t, ids, 2.5), expected)
    # at t = 1 the velocity is eps - E[x0], at t = 0 it is -x (E[eps | x0] = 0)
    flat = x.reshape(3, -1)
    weights = world.mode_weights[ids]
    torch.testing.assert_close(mixture_velocity(flat, torch.ones(3, dtype=torch.float64), world.means, weights, 0.3),
                               flat - weights @ world.means)
    torch.testing.assert_close(mixture_velocity(flat, torch.zeros(3, dtype=torch.float64), world.means, weights, 0.3),
                               -flat)


def test_teacher_module_and_ode_reach_the_mixture():
    """Unguided (g = 1), the teacher's ODE solved through FluxEulerPipeline's own loop carries noise to the data:
    its samples are as far from fresh data as two data sets are from each other, with the mixture's mode weights;
    1-step Euler collapses (far, wrong modes). The metrics can tell the two apart."""
    world = GaussianMixtureWorld(WorldConfig(guidance=1.0))
    ids = torch.arange(world.config.num_prompts).repeat_interleave(400)
    pipe = headless_pipeline("euler", ExactTeacher(world))
    ode = sample(world, pipe, ids, 128, seed=3)
    data_a, _ = world.sample(ids, torch.Generator().manual_seed(4))
    data_b, _ = world.sample(ids, torch.Generator().manual_seed(5))
    floor = evaluate_samples(world, data_b, ids, data_a)
    got = evaluate_samples(world, ode, ids, data_a)
    assert got["distance"] < 1.3 * floor["distance"] + 0.02, (got, floor)
    assert got["mode_accuracy"] > 0.99 and got["mode_tv_true"] < floor["mode_tv_true"] + 0.05, (got, floor)
    one_step = evaluate_samples(world, sample(world, pipe, ids, 1, seed=3), ids, data_a)
    assert one_step["distance"] > 4 * floor["distance"] and one_step["mode_tv_true"] > 0.5, one_step


def test_sliced_w2_of_shifted_gaussians_is_closed_form():
    """Two sets that differ by a shift m have sliced W2^2 = mean over directions of (theta . m)^2 (same sorted
    noise), which for many uniform directions tends to ||m||^2 / d."""
    d = 16
    dirs = sw_directions(d, 4096)
    x = torch.randn(1000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = torch.zeros(d, dtype=torch.float64)
    m[3] = 2.0
    exact = math.sqrt(float(((m @ dirs) ** 2).mean()))
    assert sliced_w2(x + m, x, dirs) == pytest.approx(exact, rel=1e-9)
    assert exact == pytest.approx(2.0 / math.sqrt(d), rel=0.05)


def test_exact_world_net_has_the_transformer_signature(world, tmp_path):
    from model.transformer import flux_velocity

    net = ExactWorldNet(text_dim=world.config.num_prompts + 1, width=32, depth=1)
    cond = world.encode(["prompt 1", ""])
    z = torch.randn(2, 4, 4)
    v = flux_velocity(net, z, torch.tensor([0.3, 0.9]), torch.tensor([2.0, 2.0]), cond, torch.zeros(4, 3))
    assert v.shape == z.shape
    net.add_dual_timestep_embedder(zero_init_last=True)
    v2 = flux_velocity(net, z, torch.tensor([0.3, 0.9]), torch.tensor([2.0, 2.0]), cond, torch.zeros(4, 3),
                       timestep2=torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(v2, v)  # zero-initialised second embedder: the student starts as the velocity model
    net.save_pretrained(tmp_path / "net")
    again = ExactWorldNet.from_pretrained(tmp_path / "net")
    assert again.config.dual_timestep
    torch.testing.assert_close(flux_velocity(again, z, torch.tensor([0.3, 0.9]), torch.tensor([2.0, 2.0]), cond,
                                             torch.zeros(4, 3), timestep2=torch.tensor([0.1, 0.5])), v2)
    with pytest.raises(ValueError, match="not a prompt of this exact world"):
        world.prompt_ids(["a red circle"])
