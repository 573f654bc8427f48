"""SiD (METHODS 7): the generator recursion, k, the losses against closed forms and finite differences, kappa
semantics, the Diffusion-GAN terms, and training through train_sid.py (data-free, exact resume, sampling)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.latents import image_ids
from model.samplers import sample_sid, sid_times
from model.sid import (SiDConfig, bce_per_sample, discriminator_logits, draw_k, fake_score_loss,
                       fake_score_objective, gan_schedule, generator_objective, guided_velocity, kappa_passes)
from model.text import PromptEmbeds

ROOT = Path(__file__).resolve().parent.parent


# ----- the generator -----
def test_step_times_follow_their_formula():
    assert torch.allclose(sid_times(4), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    assert torch.allclose(sid_times(2, train_steps=4), torch.tensor([1.0, 0.75]))  # a prefix of the K = 4 schedule
    assert torch.allclose(sid_times(2), torch.tensor([1.0, 0.5]))
    assert torch.allclose(sid_times(3, train_steps=3, init_time=0.6), torch.tensor([0.6, 0.4, 0.2]))
    mu = 0.63
    shifted = sid_times(4, shift_mu=mu)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(shifted, (math.exp(mu) / (math.exp(mu) + 1 / t - 1)).float())


@pytest.mark.parametrize("noise_type", ["fresh", "fixed", "ddim"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_an_oracle_generator_returns_its_x0_at_every_step_count(noise_type, steps):
    """G returns the exact velocity (x - x0*) / t of a known x0*: every step count gives x0*, and each step's input
    is (1 - t_i) x0^(i-1) + t_i n_i with the noise its type prescribes."""
    g = torch.Generator().manual_seed(0)
    x0_star, z = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    fresh = {i: torch.randn(2, 4, 8, generator=g) for i in range(1, 4)}
    times = sid_times(steps, train_steps=4)
    seen = []

    def x0_of(x, t, i):
        seen.append(x)
        return x - t * (x - x0_star) / t  # x - t v with v = (x - x0*) / t

    out = sample_sid(x0_of, z, times, noise_type, lambda i: fresh[i])
    assert torch.allclose(out, x0_star, atol=1e-6)
    for i, (x, t) in enumerate(zip(seen, times)):
        previous = torch.zeros_like(x0_star) if i == 0 else x0_star
        if i == 0 or noise_type == "fixed":
            noise = z
        elif noise_type == "fresh":
            noise = fresh[i]
        else:  # ddim: the noise the previous step implies; with t_0 = 1 and an exact x0 that is z again
            noise = z
        assert torch.allclose(x, (1 - t) * previous + t * noise, atol=1e-6), (noise_type, i)


def test_ddim_noise_is_the_noise_the_previous_step_implies():
    g = torch.Generator().manual_seed(1)
    z, a, b = (torch.randn(1, 3, 4, generator=g) for _ in range(3))
    preds = iter([a, b])
    seen = []
    times = torch.tensor([0.8, 0.4])

    def x0_of(x, t, i):
        seen.append(x)
        return next(preds)

    sample_sid(x0_of, z, times, "ddim")
    implied = (seen[0] - (1 - 0.8) * a) / 0.8
    assert torch.allclose(seen[1], (1 - 0.4) * a + 0.4 * implied, atol=1e-6)


def test_k_is_uniform_reproducible_and_the_same_for_every_rank():
    draws = [draw_k(seed=3, step=s, K=4) for s in range(4000)]
    assert draws == [draw_k(3, s, 4) for s in range(4000)]  # any process computes the same sequence
    assert set(draws) == {1, 2, 3, 4}
    counts = [draws.count(k) / len(draws) for k in (1, 2, 3, 4)]
    assert max(abs(c - 0.25) for c in counts) < 0.03
    assert draws != [draw_k(4, s, 4) for s in range(4000)]


# ----- guidance -----
class CountingFlux(torch.nn.Module):
    """A stand-in transformer: velocity = a x + b pooled[:, :1] (per sample), recording every call."""

    def __init__(self, a=2.0, b=0.5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.norm_out = torch.nn.Identity()
        self.a, self.b, self.calls = a, b, []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, img_ids,
                txt_ids, return_dict=False, **_):
        self.calls.append({"batch": hidden_states.shape[0], "pooled": pooled_projections.clone(),
                           "guidance": guidance.clone(), "x": hidden_states.detach().clone(),
                           "t": timestep.detach().clone(), "grad": torch.is_grad_enabled()})
        features = self.norm_out(hidden_states * 3)
        return (self.a * features / 3 + self.b * pooled_projections[:, :1, None] + self.weight,)


def prompts(batch, value, dim=4):
    return PromptEmbeds(torch.full((batch, 2, dim), value), torch.full((batch, dim), value), torch.zeros(2, 3))


@pytest.mark.parametrize("kappa,calls,rows", [(0.0, 1, 3), (1.0, 1, 3), (4.5, 1, 6), (-1.0, 1, 6)])
def test_kappa_semantics_count_passes_and_prompts(kappa, calls, rows):
    model = CountingFlux()
    x, s = torch.randn(3, 4, 8), torch.rand(3)
    cond, empty = prompts(3, 1.0), prompts(1, -2.0)
    out = guided_velocity(model, x, s, 3.5, kappa, cond, empty, image_ids(4, 4))
    assert len(model.calls) == calls and model.calls[0]["batch"] == rows
    seen = model.calls[0]["pooled"][:, 0]
    if kappa == 1:
        assert (seen == 1.0).all()  # the prompts only
    elif kappa == 0:
        assert (seen == -2.0).all()  # the empty prompt only
    else:
        assert (seen[:3] == 1.0).all() and (seen[3:] == -2.0).all()  # both, in one batched call
    assert (model.calls[0]["guidance"] == 3.5).all()  # the network's own guidance-embedding value
    v_c, v_u = 2 * x + 0.5 * 1.0, 2 * x + 0.5 * -2.0
    assert torch.allclose(out, v_u + kappa * (v_c - v_u), atol=1e-6)


def test_presets_set_the_kappas_they_claim():
    assert SiDConfig.preset("lsg", lsg_kappa=4.5) == dict(kappa1=4.5, kappa2=4.5, kappa3=4.5, kappa4=4.5)
    assert SiDConfig.preset("zero_cfg") == dict(kappa1=0.0, kappa2=0.0, kappa3=0.0, kappa4=1.0)
    assert SiDConfig.preset("anti_cfg", anti_cfg_scale=-1.5) == dict(kappa1=1.0, kappa2=-1.5, kappa3=-1.5,
                                                                        kappa4=1.0)
    with pytest.raises(ValueError, match="guidance_strategy"):
        SiDConfig.preset("more_cfg")
    with pytest.raises(ValueError, match="kappa2"):
        SiDConfig(kappa2=1.0, kappa3=2.0)
    assert SiDConfig(kappa1=0.0).uses_prompt_dropout and not SiDConfig().uses_prompt_dropout


# ----- losses -----
def test_fake_score_loss_equals_its_closed_form():
    g = torch.Generator().manual_seed(2)
    x_g, eps = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    s = torch.tensor([0.2, 0.5, 0.9])
    model = CountingFlux(a=0.7, b=0.3)
    cond, empty = prompts(3, 1.0), prompts(1, 0.0)
    config = SiDConfig(kappa1=1.0, ls=2.0)
    loss, logs = fake_score_objective(model, x_g, s, eps, cond, empty, image_ids(4, 4), config)
    x_s = (1 - s[:, None, None]) * x_g + s[:, None, None] * eps
    V = 0.7 * x_s + 0.3 * 1.0
    expected = ((V - (eps - x_g)) ** 2).sum() / 3 * 2.0  # sum over elements, / B, x ls
    assert torch.allclose(loss, expected, rtol=1e-6)
    # by hand, element by element for sample 0
    by_hand = sum(float((0.7 * xs + 0.3 - (e - xg)) ** 2) for xs, e, xg in
                  zip(x_s[0].flatten(), eps[0].flatten(), x_g[0].flatten()))
    per_sample = ((V - (eps - x_g)) ** 2).flatten(1).sum(1)
    assert math.isclose(per_sample[0].item(), by_hand, rel_tol=1e-5)


@pytest.fixture
def fp64_rotary(monkeypatch):
    """diffusers' FLUX attention applies its rotary embedding in fp32 (x.float()); for fp64 finite differences the
    same rotation is applied in the input's dtype (checked against diffusers' own in fp32)."""
    import diffusers.models.transformers.transformer_flux as flux

    original = flux.apply_rotary_emb

    def rotary(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        cos, sin = [f[None, :, None, :] if sequence_dim == 1 else f[None, None] for f in freqs_cis]
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return x * cos.to(x) + torch.stack([-x_imag, x_real], dim=-1).flatten(3) * sin.to(x)

    x = torch.randn(2, 5, 3, 8)
    freqs = (torch.randn(5, 8), torch.randn(5, 8))
    assert torch.allclose(rotary(x, freqs, sequence_dim=1), original(x, freqs, sequence_dim=1), atol=1e-6)
    monkeypatch.setattr(flux, "apply_rotary_emb", rotary)


@pytest.fixture(scope="module")
def fp64_networks(tiny_flux):
    from model.loading import load_transformer

    teacher = load_transformer(str(tiny_flux)).double().eval().requires_grad_(False)
    fake = load_transformer(str(tiny_flux)).double().eval().requires_grad_(False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return teacher, fake


@pytest.mark.parametrize("alpha,kappa", [(1.0, 1.0), (1.0, 2.5), (0.5, 1.0)])
def test_generator_loss_gradient_matches_central_finite_differences(fp64_networks, fp64_rotary, alpha, kappa):
    """d L_G / d x_g, through x_s into both networks (their parameters frozen), equals central differences (fp64)."""
    teacher, fake = fp64_networks
    g = torch.Generator().manual_seed(7)
    B, h = 2, 4
    cond = PromptEmbeds(torch.randn(B, 6, 32, generator=g, dtype=torch.float64),
                        torch.randn(B, 32, generator=g, dtype=torch.float64), torch.zeros(6, 3, dtype=torch.float64))
    empty = PromptEmbeds(torch.zeros(1, 6, 32, dtype=torch.float64), torch.zeros(1, 32, dtype=torch.float64),
                         torch.zeros(6, 3, dtype=torch.float64))
    ids = image_ids(h, h, dtype=torch.float64)
    x_g = torch.randn(B, (h // 2) ** 2, 64, generator=g, dtype=torch.float64)
    eps = torch.randn(x_g.shape, generator=g, dtype=torch.float64)
    s = torch.tensor([0.3, 0.8], dtype=torch.float64)
    config = SiDConfig(alpha=alpha, kappa2=kappa, kappa3=kappa, kappa4=kappa, lsg=1.0)

    def loss(x):
        return generator_objective(teacher, fake, x, s, eps, cond, empty, ids, config)[0]

    x = x_g.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x), x)
    for d in range(3):
        direction = torch.randn(x_g.shape, generator=g, dtype=torch.float64)
        step = 1e-5
        fd = (loss(x_g + step * direction) - loss(x_g - step * direction)) / (2 * step)
        assert math.isclose((grad * direction).sum().item(), fd.item(), rel_tol=1e-7), (d, fd.item())
    # the networks' inputs carry gradient: the explicit w (y_r - y_f) term alone would give another gradient
    with torch.no_grad():
        x_s = (1 - s[:, None, None]) * x_g + s[:, None, None] * eps
        v_r = guided_velocity(teacher, x_s, s, 3.5, kappa, cond, empty, ids)
        v_f = guided_velocity(fake, x_s, s, 3.5, kappa, cond, empty, ids)
        y_r, y_f = x_s - s[:, None, None] * v_r, x_s - s[:, None, None] * v_f
        explicit = -(1 - s[:, None, None]) * (y_r - y_f) / B
    assert not torch.allclose(grad, explicit, atol=1e-6)


def test_generator_loss_closed_form_and_alpha_form():
    g = torch.Generator().manual_seed(3)
    x_g, y_r, y_f = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    s = torch.tensor([0.25, 0.75])
    from model.sid import generator_loss

    for alpha in (1.0, 0.3):
        loss, _ = generator_loss(x_g, s, y_r, y_f, SiDConfig(alpha=alpha, lsg=100.0))
        w = (1 - s)[:, None, None]
        d = y_r - y_f
        # (1 - alpha) ||y_r - y_f||^2 + (y_r - y_f) . (y_f - x_g), weighted, summed, / B, x lsg
        expected = (w * ((1 - alpha) * d * d + d * (y_f - x_g))).sum() / 2 * 100.0
        assert torch.allclose(loss, expected, rtol=1e-5)
    legacy, _ = generator_loss(x_g, s, y_r, y_f, SiDConfig(weighting="sid_legacy", lsg=1.0))
    w = 1 / (x_g - y_r).abs().flatten(1).mean(1)[:, None, None]
    assert torch.allclose(legacy, (w * (y_r - y_f) * (y_f - x_g)).sum() / 2, rtol=1e-5)


# ----- Diffusion-GAN -----
def test_discriminator_logits_and_gan_losses_by_hand():
    features = torch.randn(3, 5, 6)
    logits = discriminator_logits(features)
    assert logits.shape == (3, 1, 6) and torch.allclose(logits, features.mean(1, keepdim=True))
    assert torch.allclose(bce_per_sample(torch.tensor([[[30.0, -30.0]]]), 1.0, 10.0),
                          torch.tensor([(math.log1p(math.exp(-10)) + math.log1p(math.exp(10))) / 2]))

    def bce(logit, y):  # by hand: -[y log sigmoid(logit) + (1 - y) log(1 - sigmoid(logit))]
        p = 1 / (1 + math.exp(-logit))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    real, fake = torch.tensor([[[0.5, -1.0]], [[2.0, 0.0]]]), torch.tensor([[[-0.3, 12.0]], [[1.0, 1.0]]])
    x_g = torch.zeros(2, 3, 4)  # C h w = 12 elements per sample
    V, eps = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    loss, logs = fake_score_loss(V, x_g, eps, SiDConfig(lsd=1.0), fake, real)
    by_hand = sum(0.5 * (sum(bce(v, 1) for v in r[0].tolist()) / 2 + sum(bce(min(v, 10), 0) for v in f[0].tolist())
                         / 2) for r, f in zip(real, fake)) * 12 / 2
    assert math.isclose(logs["loss_discriminator"].item(), by_hand, rel_tol=1e-5)

    from model.sid import generator_loss

    s = torch.tensor([0.4, 0.6])
    y = torch.zeros(2, 3, 4)
    total, logs = generator_loss(x_g, s, y, y, SiDConfig(lsg_gan=2.0), gan_mix=0.5, logits_generated=fake)
    adv = sum(sum(bce(min(v, 10), 1) for v in f[0].tolist()) / 2 * (1 - si) for f, si in zip(fake, s.tolist()))
    assert math.isclose(logs["loss_adversarial"].item(), adv * 12 / 2 * 2.0, rel_tol=1e-5)
    assert math.isclose(total.item(), 0.5 * logs["loss_adversarial"].item(), rel_tol=1e-6)  # L_G is 0 here


def test_gan_schedule_thresholds():
    config = SiDConfig(gan=True, gan_generator_start_images=100, gan_adv_start_images=300)
    assert gan_schedule(99, config) == (False, 0.0)
    assert gan_schedule(100, config) == (True, 0.0)
    assert gan_schedule(299, config) == (True, 0.0)
    assert gan_schedule(300, config) == (True, 0.5)
    assert gan_schedule(0, SiDConfig()) == (True, 0.0)  # without the GAN the generator trains from the start


@pytest.mark.parametrize("kappa1,seen", [(1.0, 1.0), (0.0, -3.0), (2.0, 1.0)])
def test_gan_real_branch_shares_the_noise_and_the_prompts_of_the_fake_logits(kappa1, seen):
    """The real latents are noised with the same s and eps and conditioned like the pass that gives the fake
    logits (the prompts; "" when kappa1 = 0), in the same call, so real and fake logits differ by the image only."""
    model = CountingFlux(a=1.0, b=0.0)
    g = torch.Generator().manual_seed(4)
    x_g, eps, x_real = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
    s = torch.tensor([0.3, 0.6])
    loss, logs = fake_score_objective(model, x_g, s, eps, prompts(2, 1.0), prompts(1, -3.0), image_ids(4, 4),
                                      SiDConfig(gan=True, kappa1=kappa1), x_real)
    (call,) = model.calls
    passes = 1 if kappa1 in (0, 1) else 2
    assert call["batch"] == 2 * (passes + 1) and (call["pooled"][-2:, 0] == seen).all()
    assert "loss_discriminator" in logs and torch.isfinite(loss)
    # the real rows are x_real noised with the fake rows' own s and eps: same times, same noise
    x_s = (1 - s[:, None, None]) * x_g + s[:, None, None] * eps
    x_real_s = (1 - s[:, None, None]) * x_real + s[:, None, None] * eps
    assert torch.allclose(call["x"][:2], x_s) and torch.allclose(call["x"][-2:], x_real_s)
    assert torch.equal(call["t"][-2:], call["t"][:2]) and torch.allclose(call["t"][:2], s)


@pytest.mark.parametrize("kappa1,kappa2,calls_rows", [(1.0, 1.0, 2), (0.0, 1.0, 4), (0.0, -1.0, 4), (1.0, 0.0, 4)])
def test_the_generators_adversarial_logits_use_the_discriminators_conditioning(kappa1, kappa2, calls_rows):
    """l_G comes from a fake-score pass conditioned like the discriminator's (kappa1 = 0: ""), added to kappa2's
    passes in the same call only when they lack it."""
    teacher, fake = CountingFlux(), CountingFlux()
    x_g = torch.randn(2, 4, 8, requires_grad=True)
    config = SiDConfig(gan=True, kappa1=kappa1, kappa2=kappa2, kappa3=kappa2)
    loss, logs = generator_objective(teacher, fake, x_g, torch.tensor([0.3, 0.6]), torch.randn(2, 4, 8),
                                     prompts(2, 1.0), prompts(1, -3.0), image_ids(4, 4), config, gan_mix=0.5)
    (call,) = fake.calls
    assert call["batch"] == calls_rows and "loss_adversarial" in logs
    loss.backward()
    assert x_g.grad is not None and torch.isfinite(x_g.grad).all()


def test_kappa_passes_order_prompts_first():
    x, s = torch.zeros(2, 1, 1), torch.zeros(2)
    passes = kappa_passes(x, s, 2.0, prompts(2, 1.0), prompts(1, 0.0))
    assert [p[2].pooled_prompt_embeds[0, 0].item() for p in passes] == [1.0, 0.0]


# ----- training end to end -----
def sid_args(tiny_flux, prompts_file, out, *extra):
    return ["--pretrained_model_name_or_path", str(tiny_flux), "--prompts_file", str(prompts_file),
            "--resolution", "32", "--train_batch_size", "2", "--max_sequence_length", "16",
            "--dataloader_num_workers", "0", "--output_dir", str(out), "--report_to", "none",
            "--learning_rate", "1e-3", "--seed", "5", "--num_generator_steps", "3", *extra]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    from toyworld.world import eval_metadata

    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(m["prompt"] for m in eval_metadata(2, 0)) + "\n")  # 12 prompts
    return path


def train(argv):
    from accelerate.state import AcceleratorState, GradientState

    import train_sid

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return train_sid.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_data_free_training_resumes_exactly_and_exports_a_sampler(tiny_flux, prompts_file, tmp_path):
    """From a prompts file alone: 4 straight steps equal 2 + resume + 2 bitwise (both networks, both optimizers,
    the EMA, the random streams and k); the generator export samples 1/2/4 steps with test_sid.py."""
    common = ("--checkpointing_steps", "2", "--ema_decay", "0.5", "--guidance_strategy", "anti_cfg",
              "--gradient_checkpointing")
    straight = train(sid_args(tiny_flux, prompts_file, tmp_path / "straight", "--max_train_steps", "4", *common))
    train(sid_args(tiny_flux, prompts_file, tmp_path / "resumed", "--max_train_steps", "2", *common))
    resumed = train(sid_args(tiny_flux, prompts_file, tmp_path / "resumed", "--max_train_steps", "4", *common,
                             "--resume_from_checkpoint", "latest"))
    a, b = (load_file(Path(p) / "diffusion_pytorch_model.safetensors") for p in (straight, resumed))
    start = load_file(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in start)  # the generator trained
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("model.safetensors", "model_1.safetensors"):  # the fake score and the raw generator
        x, y = (load_file(tmp_path / run / "checkpoint-4" / name) for run in ("straight", "resumed"))
        assert all(torch.equal(x[k], y[k]) for k in x), name
    k_straight = torch.load(tmp_path / "straight" / "checkpoint-4" / "rank_state_0.pt", weights_only=True)
    k_resumed = torch.load(tmp_path / "resumed" / "checkpoint-4" / "rank_state_0.pt", weights_only=True)
    assert k_straight["method"]["k_history"] == k_resumed["method"]["k_history"]
    assert [k for _, k in k_straight["method"]["k_history"]] == [draw_k(5, s, 3) for s in range(4)]
    meta = json.loads((Path(straight) / "sampling.json").read_text())
    assert meta["train_steps"] == 3 and meta["method"] == "sid" and meta["time_input_scale"] == 1000.0
    assert (tmp_path / "straight" / "ckpts" / "transformer_4.pt").exists()

    import test_sid

    runs = test_sid.main(["--pretrained_model_name_or_path", str(tiny_flux), "--resume_path",
                          str(tmp_path / "straight" / "ckpts" / "transformer_4.pt"), "--num_inference_steps", "1", "2",
                          "3", "--resolution", "32", "--limit", "2", "--max_sequence_length", "16", "--output_dir",
                          str(tmp_path / "geneval")])
    assert [r.parent.parent.name for r in runs] == [f"GenEval_RESOLUTION32_NFE{n}_cfg3.5" for n in (1, 2, 3)]
    assert all(len(list(r.glob("0000[01]/samples/*.png"))) == 8 for r in runs)
    config = json.loads((runs[1] / "run_config.json").read_text())
    assert config["train_steps"] == 3 and config["noise_type"] == "fresh"  # read from the export


def test_overriding_kappa2_sets_kappa3_and_anti_cfg_trains_both_branches():
    import train_sid

    base = ["--pretrained_model_name_or_path", "unused", "--prompts_file", str(Path(__file__))]
    config = train_sid.SiD(train_sid.parse_args(base + ["--kappa2", "-2"])).config
    assert (config.kappa1, config.kappa2, config.kappa3, config.kappa4) == (1.0, -2.0, -2.0, 1.0)
    config = train_sid.SiD(train_sid.parse_args(base + ["--guidance_strategy", "anti_cfg"])).config
    assert config.kappa1 == 1.0 and config.uses_prompt_dropout  # f_psi learns "" and c, which kappa2 = -1 mixes


# ----- what runs with and without gradients; prompt dropout; weights -----
@pytest.mark.parametrize("k", [1, 2, 3])
def test_generator_runs_k_minus_1_steps_without_grad_and_step_k_with_grad(k):
    from model.sid import generate

    model = CountingFlux()
    config = SiDConfig(num_generator_steps=3)
    noise = torch.randn(2, 4, 8)
    x_g = generate(model, noise, k, prompts(2, 1.0), image_ids(4, 4), config, lambda _: torch.randn(2, 4, 8), True)
    assert [c["grad"] for c in model.calls] == [False] * (k - 1) + [True]
    assert x_g.requires_grad  # through the last step's parameters only
    (grad,) = torch.autograd.grad(x_g.sum(), model.weight)
    t_k = float(sid_times(3, 1.0)[k - 1])
    assert torch.allclose(grad, torch.tensor([-t_k * x_g.numel()]))  # x0 = x - t v, v = ... + weight: one step
    model.calls.clear()
    x_g = generate(model, noise, k, prompts(2, 1.0), image_ids(4, 4), config, lambda _: torch.randn(2, 4, 8), False)
    assert [c["grad"] for c in model.calls] == [False] * k and not x_g.requires_grad


def sid_method(*extra):
    import train_sid

    args = train_sid.parse_args(["--pretrained_model_name_or_path", "unused", "--prompts_file", str(Path(__file__)),
                                 "--num_generator_steps", "2", *extra])
    method = train_sid.SiD(args)
    method.empty, method.latent_channels = prompts(1, -3.0), 8
    return method


@pytest.mark.parametrize("strategy,dropped", [("lsg", False), ("anti_cfg", True), ("zero_cfg", True)])
def test_prompt_dropout_is_applied_exactly_when_a_kappa_needs_the_empty_prompt(strategy, dropped, monkeypatch):
    """With --prompt_dropout 1 every fake-score prompt becomes "" when kappa1 or kappa2 is not 1 (Anti-CFG,
    Zero-CFG), and none does when both are 1 (LSG at its default kappa 1)."""
    import train_sid
    from training.method import Batch

    method = sid_method("--guidance_strategy", strategy, "--prompt_dropout", "1.0")
    seen = {}

    def objective(fake, x_g, s, eps, cond, empty, img_ids, config, x_real=None, batch_size=None):
        seen["pooled"] = cond.pooled_prompt_embeds.clone()
        return torch.zeros(()), {}

    monkeypatch.setattr(train_sid, "fake_score_objective", objective)
    monkeypatch.setattr(method, "draw", lambda *a, **k: (1, torch.randn(3, 4, 8)))
    batch = Batch(None, prompts(3, 1.0), image_ids(4, 4), ["a", "b", "c"], (4, 4))
    nets = type("Nets", (), {"wrapped": staticmethod(lambda name: None)})()
    method.fake_score_loss(nets, None, batch, 0, torch.Generator().manual_seed(0))
    assert method.config.uses_prompt_dropout == dropped
    assert (seen["pooled"] == (-3.0 if dropped else 1.0)).all()


def test_the_fake_score_gets_no_gradient_in_the_generator_phase(tiny_flux, prompts_file, tmp_path, monkeypatch):
    """Through the Trainer: the generator phase's backward leaves every fake-score gradient as it was (its
    parameters are frozen from the loss's forward to the end of its backward) and gives the generator one."""
    from training.trainer import Trainer

    original = Trainer._backward
    records = []

    def backward(self, net, loss, last):
        snapshot = {n: (None if p.grad is None else p.grad.clone())
                    for n, p in self.nets["fake_score"].plain.named_parameters()}
        original(self, net, loss, last)
        after = {n: p.grad for n, p in self.nets["fake_score"].plain.named_parameters()}
        changed = [n for n in after if (after[n] is None) != (snapshot[n] is None)
                   or (after[n] is not None and not torch.equal(after[n], snapshot[n]))]
        generator_grads = [p.grad for p in self.nets["generator"].plain.parameters() if p.requires_grad]
        records.append((net.name, changed, any(g is not None and g.abs().sum() > 0 for g in generator_grads)))

    monkeypatch.setattr(Trainer, "_backward", backward)
    train(sid_args(tiny_flux, prompts_file, tmp_path / "run", "--max_train_steps", "2"))
    generator_phases = [r for r in records if r[0] == "generator"]
    fake_phases = [r for r in records if r[0] == "fake_score"]
    assert len(generator_phases) == 2 and len(fake_phases) == 2
    assert all(changed == [] for _, changed, _ in generator_phases), records
    assert generator_phases[-1][2]  # (at step 0 the fake score equals the teacher: L_G's gradient is exactly 0)
    assert all(changed for _, changed, _ in fake_phases)  # the check sees gradients when they arrive


def test_inverse_sigma_weights_are_capped_at_1e5():
    from model.sid import WEIGHTINGS

    s = torch.tensor([1e-7, 1e-5, 1e-3, 0.5])
    assert torch.allclose(WEIGHTINGS["inv_sigma"](s), torch.tensor([1e5, 1e5, 1e3, 2.0]))
    assert torch.allclose(WEIGHTINGS["inv_sigma_sq"](s), torch.tensor([1e5, 1e5, 1e5, 4.0]))


def test_with_the_gan_only_the_fake_score_phase_encodes_images(tiny_flux, tmp_path, monkeypatch):
    """Real images feed the discriminator, in the fake-score phase only: one VAE encoding per iteration."""
    import training.trainer as trainer_module
    from data.synthetic import make_synthetic_dataset

    dataset = make_synthetic_dataset(tmp_path / "data", num_images=8, resolution=32, seed=0)
    original, calls = trainer_module.encode_images, []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "encode_images", counting)
    args = sid_args(tiny_flux, "unused", tmp_path / "run", "--max_train_steps", "2", "--gan",
                    "--gan_generator_start_images", "0", "--gan_adv_start_images", "2")
    args = [a for i, a in enumerate(args) if a != "--prompts_file" and args[i - 1] != "--prompts_file"]
    train(args + ["--dataset_name", str(dataset)])
    assert len(calls) == 2  # 2 iterations x (fake score: encoded; generator: not)
