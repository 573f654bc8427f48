"""The exact world (exactworld/): its closed-form teacher, its metrics, and convergence of every method's own loss.

The convergence tests train through `training.Trainer` with the unchanged losses of model/scm.py, model/meanflow.py
and model/sid.py (via the entry scripts' method classes), starting from a small velocity fit shared by the session,
and fail when a student stops reaching the teacher's ODE distribution in few steps.
"""

import math
from pathlib import Path

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


# ----- convergence of each method's own loss (training.Trainer, unchanged losses) -----
# A smaller world than the benchmark's (4 prompts of 2 modes), so that each method converges in well under a minute;
# its teacher's 1-step Euler still collapses (distance ~3.5x its 4-step Euler's, mode accuracy ~0.75).
SMALL = ["--world_prompts", "4", "--world_modes_per_prompt", "2"]
FIT = ["--max_train_steps", "1200", "--train_batch_size", "128", "--learning_rate", "2e-3", "--lr_scheduler", "cosine",
       "--width", "128", "--depth", "3"]
COMMON = ["--lr_warmup_steps", "20", "--adam_weight_decay", "0", "--ema_decay", "0.99", "--checkpointing_steps", "0",
          "--seed", "0", *SMALL]
GUIDANCE = {"scm": ["--scm_cfg_scale", "2.0"], "meanflow": ["--cfg_scale", "2.0"],
            "sid": ["--teacher_guidance", "2", "--generator_guidance", "2", "--fake_guidance", "2"]}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The small world, its velocity fit (the students' start), the teacher ODE's references, and the teacher's own
    Euler scores against them."""
    from exactworld.train import train

    world = GaussianMixtureWorld(WorldConfig(num_prompts=4, modes_per_prompt=2))
    out = tmp_path_factory.mktemp("exact")
    fit = train(["--method", "fit", "--output_dir", str(out / "fit"), *COMMON, *FIT])
    refs = References.make(world, 256)
    euler = {r["nfe"]: r for r in score_model(world, refs, "euler", ExactTeacher(world), [1, 2, 4, 8])}
    assert euler[1]["distance"] > 3 * euler[4]["distance"] and euler[1]["mode_accuracy"] < 0.8, euler
    return world, out, fit, refs, euler


def train_and_score(fitted, method, flags, nfes=(1, 2)):
    from exactworld.evaluate import load_export
    from exactworld.train import train

    world, out, fit, refs, _ = fitted
    export = train(["--method", method, "--output_dir", str(out / method), "--init", str(fit), *COMMON,
                    *GUIDANCE[method], *flags])
    return {r["nfe"]: r for r in score_model(world, refs, method, load_export(export), list(nfes), export=export)}


def test_exact_scm_converges_to_the_teacher_ode(fitted):
    """sCM (model/scm.py through train_sCM.SCM): from the velocity fit, whose own 1-step Euler collapses, the 1- and
    2-step students come within the teacher's 4-step Euler distance with the prompts' modes, and the 1-step map is
    close to the ODE's per sample (measured: 0.133 / 0.133 against 0.161, accuracy 0.95)."""
    *_, euler = fitted
    got = train_and_score(fitted, "scm", ["--max_train_steps", "600", "--train_batch_size", "128",
                                          "--learning_rate", "2e-4", "--lr_scheduler", "cosine",
                                          "--tangent_warmup_steps", "100", "--logit_mean", "0.2",
                                          "--logit_std", "1.6"])
    assert max(got[1]["distance"], got[2]["distance"]) <= euler[4]["distance"], (got, euler[4])
    assert min(got[1]["mode_accuracy"], got[2]["mode_accuracy"]) >= 0.9, got
    assert got[1]["per_sample_error"] < 0.5 * euler[1]["per_sample_error"], (got, euler[1])


def test_exact_meanflow_converges_to_the_teacher_ode(fitted):
    """MeanFlow (model/meanflow.py through train_meanflow.MeanFlow, plain squared error): at 1 and 2 steps within
    the teacher's 4-step Euler distance, its deterministic maps close to the ODE's per sample (measured: 0.123 /
    0.088 against 0.161)."""
    *_, euler = fitted
    got = train_and_score(fitted, "meanflow", ["--max_train_steps", "600", "--train_batch_size", "128",
                                               "--learning_rate", "3e-4", "--lr_scheduler", "cosine",
                                               "--zero_init_dual", "--weighting", "uniform"])
    assert max(got[1]["distance"], got[2]["distance"]) <= euler[4]["distance"], (got, euler[4])
    assert min(got[1]["mode_accuracy"], got[2]["mode_accuracy"]) >= 0.95, got
    assert got[2]["per_sample_error"] < 0.5 * euler[2]["per_sample_error"], (got, euler[2])


def test_exact_sid_converges_to_the_teacher_distribution(fitted):
    """SiD (model/sid.py through train_sid.SiD, data-free, LSG): the K = 2 generator at 1 and 2 steps beats the
    teacher's 2-step Euler by a wide margin and is near its 4-step one, with the prompts' modes (measured: 0.158 /
    0.154 against Euler 0.248 at 2 steps and 0.161 at 4)."""
    *_, euler = fitted
    got = train_and_score(fitted, "sid", ["--max_train_steps", "500", "--train_batch_size", "128",
                                          "--learning_rate", "3e-4", "--fake_learning_rate", "3e-4",
                                          "--num_generator_steps", "2", "--lr_scheduler", "cosine"])
    assert max(got[1]["distance"], got[2]["distance"]) <= 0.8 * euler[2]["distance"], (got, euler[2])
    assert max(got[1]["distance"], got[2]["distance"]) <= 1.25 * euler[4]["distance"], (got, euler[4])
    assert min(got[1]["mode_accuracy"], got[2]["mode_accuracy"]) >= 0.95, got


def test_benchmark_refuses_a_student_trained_with_another_recipe(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "script"))
    import exact_world_benchmark as bench

    from common.cli import UsageError

    bench.claim_student(tmp_path, "sid", ["--max_train_steps", "5"])
    bench.claim_student(tmp_path, "sid", ["--max_train_steps", "5"])  # the same recipe continues
    with pytest.raises(UsageError, match="another recipe"):
        bench.claim_student(tmp_path, "sid", ["--max_train_steps", "6"])
    (tmp_path / "scm").mkdir()
    (tmp_path / "scm" / "checkpoint-1").mkdir()
    with pytest.raises(UsageError, match="no recipe.json"):
        bench.claim_student(tmp_path, "scm", ["--max_train_steps", "5"])
