"""SiD: data-free few-step Score identity Distillation of a FLUX flow teacher (METHODS 7).

Three FLUX transformers, all velocity models V in flow time (x_s = (1 - s) x0 + s eps, s = 1 is noise), whose
x0 prediction is x0_hat = x_s - s V(x_s, s) (METHODS 7.1):
- f_phi, the frozen teacher; f_psi, the fake score, trained on the generator's samples; G_theta, the K-step
  generator. Both trained networks start as copies of the teacher.
- Guidance, two knobs per network (METHODS 7.8): true CFG with kappa against the empty prompt,
  N^kappa = N(x, s, "") + kappa (N(x, s, c) - N(x, s, "")), with kappa1 (fake-score loss), kappa2 = kappa3 (the
  fake score in the generator loss) and kappa4 (the teacher); and the value each network's FLUX guidance
  embedding is fed. kappa = 1 is one conditional pass, kappa = 0 one pass on the empty prompt, any other value
  both passes in one batched call.

What is here, each loss on one screen:
- `SiDConfig`: every hyper-parameter, with the presets `lsg`, `zero_cfg`, `anti_cfg`.
- `generator_times`, `draw_k`, `generate`: the K step times, the uniform-mixture draw of k (the same on every
  rank, a function of (seed, step)), and the recursion with steps 1..k-1 under no_grad.
- `guided_velocity`: N^kappa, optionally capturing the Diffusion-GAN features of the conditional pass.
- `fake_score_loss`: L_psi (+ L_D); `generator_loss`: L_G (+ L_adv) with the alpha form of METHODS 7.4;
  `fake_score_objective` / `generator_objective`: each phase from (x_g, s, eps) through the networks.

Latents are packed [B, L, 64]; per-sample scalars are [B] and broadcast as [B, 1, 1]; time math is fp32 (fp64 for
fp64 inputs). Losses are sums over a sample's elements, averaged over the per-process batch (SiD's convention).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import UsageError

from .conventions import flux_mu
from .samplers import NOISE_TYPES, sample_sid, sid_times
from .text import PromptEmbeds
from .transformer import flux_velocity

Tensor = torch.Tensor

WEIGHT_FLOOR = 1e-5  # the 1/s weightings' denominators are clipped here (SiD-DiT), so no weight exceeds 1e5
WEIGHTINGS = {
    "1_minus_sigma": lambda s: 1 - s,  # SiD-DiT's default
    "1_minus_sigma_sq": lambda s: (1 - s) ** 2,
    "inv_sigma": lambda s: 1 / s.clamp_min(WEIGHT_FLOOR),  # at most 1e5, as SiD-DiT clips
    "inv_sigma_sq": lambda s: 1 / (s ** 2).clamp_min(WEIGHT_FLOOR),
    "snr": lambda s: ((1 - s) / s) ** 2,  # alpha^2 / sigma^2 of the flow path
    "sid_legacy": None,  # SiD-LSG: 1 / max(mean |x_g - y_r|, 1e-5), per sample, detached (needs the samples)
}
STRATEGIES = ("lsg", "zero_cfg", "anti_cfg")


@dataclass
class SiDConfig:
    """Hyper-parameters of SiD (METHODS 7.2-7.8). Defaults that no public code fixes are ours (README).

    - num_generator_steps K, init_time t_init, time_shift (FLUX's resolution shift of the step times),
      noise_type fresh | fixed | ddim: the generator (METHODS 7.2).
    - time_mean, time_std: s = sigmoid(N(time_mean, time_std^2)) for both losses (SiD-DiT: ln 2, 1.6).
    - alpha, weighting, ls / lsg / lsd / lsg_gan: the loss (METHODS 7.3, 7.4, 7.6).
    - kappa1..kappa4: true-CFG scales; teacher_guidance / generator_guidance / fake_guidance: the value each
      network's FLUX guidance embedding is fed.
    - prompt_dropout: share of the fake-score batch whose prompt becomes "" when kappa1 or kappa2 is not 1.
    - gan: the Diffusion-GAN term; the generator waits gan_generator_start_images images, then uses L_G alone
      until gan_adv_start_images, then (L_G + L_adv) / 2 (METHODS 7.6).
    """

    num_generator_steps: int = 4
    init_time: float = 1.0
    time_shift: bool = False
    noise_type: str = "fresh"
    time_mean: float = math.log(2.0)
    time_std: float = 1.6
    alpha: float = 1.0
    weighting: str = "1_minus_sigma"
    ls: float = 1.0
    lsg: float = 100.0
    lsd: float = 1.0
    lsg_gan: float = 1.0
    kappa1: float = 1.0
    kappa2: float = 1.0
    kappa3: float = 1.0
    kappa4: float = 1.0
    teacher_guidance: float = 3.5
    generator_guidance: float = 3.5
    fake_guidance: float = 3.5
    prompt_dropout: float = 0.1
    gan: bool = False
    gan_generator_start_images: int = 20_000
    gan_adv_start_images: int = 40_000
    logit_clip: float = 10.0

    def __post_init__(self):
        if self.num_generator_steps < 1:
            raise UsageError(f"--num_generator_steps {self.num_generator_steps}: the generator needs K >= 1 steps")
        if not 0 < self.init_time <= 1:
            raise UsageError(f"--init_time {self.init_time} must lie in (0, 1] (flow time, 1 = pure noise)")
        if self.noise_type not in NOISE_TYPES:
            raise UsageError(f"--noise_type {self.noise_type!r}: choose one of {', '.join(NOISE_TYPES)}")
        if self.weighting not in WEIGHTINGS:
            raise UsageError(f"--sid_weighting {self.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        if self.kappa2 != self.kappa3:
            raise UsageError(f"--kappa2 {self.kappa2} and --kappa3 {self.kappa3} differ; SiD's generator loss uses "
                             "one fake-score scale (kappa2 = kappa3)")
        if self.gan_adv_start_images < self.gan_generator_start_images:
            raise UsageError("--gan_adv_start_images must be >= --gan_generator_start_images")

    @staticmethod
    def preset(strategy: str, lsg_kappa: float = 1.0, anti_cfg_scale: float = -1.0) -> dict[str, float]:
        """kappa1..kappa4 of a guidance strategy (METHODS 7.5, 7.9; Zero-CFG / Anti-CFG values are our choice)."""
        if strategy == "lsg":
            return dict(kappa1=lsg_kappa, kappa2=lsg_kappa, kappa3=lsg_kappa, kappa4=lsg_kappa)
        if strategy == "zero_cfg":
            return dict(kappa1=0.0, kappa2=0.0, kappa3=0.0, kappa4=1.0)
        if strategy == "anti_cfg":  # kappa1 = 1 (with prompt dropout): f_psi learns both branches kappa2 mixes
            return dict(kappa1=1.0, kappa2=anti_cfg_scale, kappa3=anti_cfg_scale, kappa4=1.0)
        raise UsageError(f"--guidance_strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")

    @property
    def uses_prompt_dropout(self) -> bool:
        return self.prompt_dropout > 0 and (self.kappa1 != 1 or self.kappa2 != 1)


# ----- the generator (METHODS 7.2) -----
def generator_times(config: SiDConfig, image_seq_len: int) -> Tensor:
    """t_i = t_init (1 - i / K), i = 0..K-1, optionally shifted like FLUX's schedule for `image_seq_len` tokens."""
    K = config.num_generator_steps
    return sid_times(K, K, config.init_time, flux_mu(image_seq_len) if config.time_shift else None)


def draw_k(seed: int, step: int, K: int) -> int:
    """k ~ U{1..K} for iteration `step`: a function of (seed, step) only, so every rank draws the same k without
    communication and a resumed run draws what the uninterrupted one did."""
    return 1 + int(np.random.SeedSequence([seed, step, 7919]).generate_state(1, np.uint64)[0] % K)


def generate(model, noise: Tensor, k: int, cond: PromptEmbeds, img_ids: Tensor, config: SiDConfig,
             fresh_noise: Callable[[int], Tensor], grad: bool) -> Tensor:
    """x_g = x0_hat^(k-1): the first k steps of the K-step recursion; steps 1..k-1 run under no_grad and step k
    with gradients when `grad` (METHODS 7.2). One transformer call per step."""
    times = generator_times(config, noise.shape[1]).to(noise.device)[:k]
    guidance = torch.full((noise.shape[0],), config.generator_guidance, device=noise.device)

    def x0_of(x, t, i):
        with torch.set_grad_enabled(grad and i == k - 1):
            tau = t.expand(x.shape[0])
            return x - t * flux_velocity(model, x, tau, guidance, cond, img_ids)

    return sample_sid(x0_of, noise, times, config.noise_type, fresh_noise)


# ----- guided predictions (METHODS 7.4) -----
@contextmanager
def capture_image_features(model):
    """Collects the transformer's image-token features after `norm_out` (before `proj_out`): [B, L, D]. `model`
    may be DDP- or DeepSpeed-wrapped (the hook goes on the inner module)."""
    store: dict[str, Tensor] = {}
    inner = model.module if hasattr(model, "module") else model
    handle = inner.norm_out.register_forward_hook(lambda module, args, out: store.__setitem__("features", out))
    try:
        yield store
    finally:
        handle.remove()


def kappa_passes(x: Tensor, s: Tensor, kappa: float, cond: PromptEmbeds, empty: PromptEmbeds) -> list[tuple]:
    """The transformer passes N^kappa needs, as (x, s, prompts): kappa = 1 the prompts, kappa = 0 the empty
    prompt, otherwise both (the prompts first)."""
    blank = empty.repeat_interleave(x.shape[0]) if len(empty) == 1 else empty
    if kappa == 1:
        return [(x, s, cond)]
    if kappa == 0:
        return [(x, s, blank)]
    return [(x, s, cond), (x, s, blank)]


def pass_index(kappa: float, on_prompts: bool) -> int | None:
    """Where `kappa_passes(kappa)` has its pass on the prompts (with on_prompts False: on ""), or None."""
    if on_prompts:
        return None if kappa == 0 else 0
    return 0 if kappa == 0 else (None if kappa == 1 else 1)


def combine(outputs: list[Tensor], kappa: float) -> Tensor:
    """N^kappa = N("") + kappa (N(c) - N("")) from the outputs of `kappa_passes`."""
    if kappa in (0, 1):
        return outputs[0]
    v_c, v_u = outputs
    return v_u + kappa * (v_c - v_u)


def run_passes(model, passes: list[tuple], guidance: float, img_ids: Tensor, capture: bool = False):
    """One transformer call on the concatenated passes [(x, s, prompts), ...] (one graph, one DDP/DeepSpeed
    forward); returns the velocities per pass and, with `capture`, the image features per pass (else None)."""
    sizes = [p[0].shape[0] for p in passes]
    x = torch.cat([p[0] for p in passes])
    s = torch.cat([p[1] for p in passes])
    cond = PromptEmbeds.cat([p[2].to(x.device) for p in passes])
    g = torch.full((x.shape[0],), guidance, device=x.device)
    with capture_image_features(model) if capture else nullcontext({}) as store:
        v = flux_velocity(model, x, s, g, cond, img_ids)
    return list(v.split(sizes)), (list(store["features"].split(sizes)) if capture else None)


def guided_velocity(model, x: Tensor, s: Tensor, guidance: float, kappa: float, cond: PromptEmbeds,
                    empty: PromptEmbeds, img_ids: Tensor, features: dict | None = None) -> Tensor:
    """N^kappa(x, s, c) = N(x, s, "") + kappa (N(x, s, c) - N(x, s, "")), in at least fp32, in one call.

    kappa = 1: one pass on the prompts; kappa = 0: one pass on the empty prompt; otherwise both, batched. With
    `features` (a dict), the Diffusion-GAN features of the first pass (the prompts', or the only one) are stored
    under "features".
    """
    outputs, captured = run_passes(model, kappa_passes(x, s, kappa, cond, empty), guidance, img_ids,
                                   capture=features is not None)
    if features is not None:
        features["features"] = captured[0]
    return combine(outputs, kappa)


def x0_from_velocity(x_s: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """x0_hat = x_s - s V (METHODS 7.1); s is [B]."""
    return x_s - s.reshape(-1, 1, 1) * v


def draw_noise_level(batch: int, generator: torch.Generator, config: SiDConfig) -> Tensor:
    """s = sigmoid(N(time_mean, time_std^2)), fp32 [B] (biased to high noise with SiD-DiT's ln 2, 1.6)."""
    return torch.sigmoid(config.time_mean + config.time_std * torch.randn(batch, generator=generator))


# ----- losses -----
def discriminator_logits(features: Tensor) -> Tensor:
    """Diffusion-GAN logits: the image-token features mean-pooled, one logit per channel: [B, 1, D] (fp32)."""
    return features.float().mean(dim=1, keepdim=True)


def bce_per_sample(logits: Tensor, target: float, clip: float) -> Tensor:
    """mean over channels of BCE(clip(logits, +-clip), target): [B]."""
    logits = logits.clamp(-clip, clip)
    loss = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    return loss.flatten(1).mean(1)


def fake_score_loss(V_psi: Tensor, x_g: Tensor, eps: Tensor, config: SiDConfig,
                    logits_fake: Tensor | None = None, logits_real: Tensor | None = None,
                    batch_size: int | None = None) -> tuple[Tensor, dict]:
    """L_psi = sum_elements ||V_psi^kappa1(x_s, s, c) - (eps - sg(x_g))||^2 / B * ls (METHODS 7.3), where
    x_s = (1 - s) sg(x_g) + s eps; plus, with the GAN, the discriminator loss of the same pass (METHODS 7.6):
    L_D = sum_b 1/2 [BCE(l_real, 1) + BCE(l_fake, 0)] * (C h w) / B * lsd. B is the per-process batch
    (`batch_size`, default the samples given: dropped non-finite samples still count)."""
    B, n = batch_size or x_g.shape[0], x_g[0].numel()
    target = eps.float() - x_g.detach().float()
    loss_psi = (V_psi.float() - target).square().flatten(1).sum(1).sum() / B * config.ls
    logs = {"loss_fake_score": loss_psi.detach()}
    if logits_fake is None:
        return loss_psi, logs
    loss_d = (0.5 * (bce_per_sample(logits_real, 1.0, config.logit_clip)
                     + bce_per_sample(logits_fake, 0.0, config.logit_clip))).sum() * n / B * config.lsd
    logs["loss_discriminator"] = loss_d.detach()
    return loss_psi + loss_d, logs


def sid_weight(s: Tensor, x_g: Tensor, y_r: Tensor, config: SiDConfig) -> Tensor:
    """w per sample [B, 1, 1] (METHODS 7.4), detached."""
    if config.weighting == "sid_legacy":
        w = 1 / (x_g - y_r).abs().flatten(1).mean(1).clamp_min(1e-5)
    else:
        w = WEIGHTINGS[config.weighting](s.to(x_g.dtype))
    return w.detach().reshape(-1, 1, 1)


def generator_loss(x_g: Tensor, s: Tensor, y_r: Tensor, y_f: Tensor, config: SiDConfig, gan_mix: float = 0.0,
                   logits_generated: Tensor | None = None, batch_size: int | None = None) -> tuple[Tensor, dict]:
    """L_G = sum_elements w (y_r - y_f) ((y_r - x_g) - alpha (y_r - y_f)) / B * lsg (METHODS 7.4).

    y_r (teacher, kappa4) and y_f (fake score, kappa2) are x0 predictions at x_s = (1 - s) x_g + s eps, computed
    with gradients through x_s; the networks' parameters are frozen in this phase. With the GAN, from the
    schedule's point on (gan_mix = 1/2): (1 - gan_mix) L_G + gan_mix L_adv, L_adv = sum_b BCE(l_G, 1) w (C h w)
    / B * lsg_gan (METHODS 7.6). B is the per-process batch (`batch_size`, default the samples given).
    """
    B, n = batch_size or x_g.shape[0], x_g[0].numel()
    w = sid_weight(s, x_g, y_r, config)
    diff = y_r - y_f
    loss_g = (w * diff * ((y_r - x_g) - config.alpha * diff)).flatten(1).sum(1).sum() / B * config.lsg
    logs = {"loss_generator": loss_g.detach(), "generator_weight": w.mean().detach()}
    if logits_generated is None or gan_mix == 0:
        return loss_g, logs
    loss_adv = (bce_per_sample(logits_generated, 1.0, config.logit_clip) * w.flatten()).sum() * n / B * config.lsg_gan
    logs["loss_adversarial"] = loss_adv.detach()
    return (1 - gan_mix) * loss_g + gan_mix * loss_adv, logs


def fake_score_objective(fake, x_g: Tensor, s: Tensor, eps: Tensor, cond: PromptEmbeds, empty: PromptEmbeds,
                         img_ids: Tensor, config: SiDConfig, x_real: Tensor | None = None,
                         batch_size: int | None = None) -> tuple[Tensor, dict]:
    """The fake-score phase given x_g, s and eps: x_s = (1 - s) sg(x_g) + s eps, V_psi^kappa1 in one call of
    `fake`; for the GAN, the real branch (1 - s) x_real + s eps is appended to the same call with the prompts of the
    first pass (the real images' own captions, after the same dropout; "" when kappa1 = 0), so the discriminator's
    real and fake logits differ by the image only. Then `fake_score_loss`."""
    x_g = x_g.detach()
    x_s = (1 - s[:, None, None]) * x_g + s[:, None, None] * eps
    passes = kappa_passes(x_s, s, config.kappa1, cond, empty)
    gan = x_real is not None
    if gan:
        passes.append(((1 - s[:, None, None]) * x_real + s[:, None, None] * eps, s, passes[0][2]))
    outputs, features = run_passes(fake, passes, config.fake_guidance, img_ids, capture=gan)
    V_psi = combine(outputs[:len(passes) - int(gan)], config.kappa1)
    logits = (discriminator_logits(features[0]), discriminator_logits(features[-1])) if gan else (None, None)
    return fake_score_loss(V_psi, x_g, eps, config, *logits, batch_size=batch_size)


def generator_objective(teacher, fake, x_g: Tensor, s: Tensor, eps: Tensor, cond: PromptEmbeds,
                        empty: PromptEmbeds, img_ids: Tensor, config: SiDConfig, gan_mix: float = 0.0,
                        batch_size: int | None = None) -> tuple[Tensor, dict]:
    """The generator phase given x_g (with its graph), s and eps: x_s = (1 - s) x_g + s eps; y_r from the teacher
    with kappa4, y_f from the fake score with kappa2 (its parameters frozen by the caller); samples whose y_r or
    y_f is not finite are dropped; then `generator_loss`. With the GAN (gan_mix > 0), l_G comes from the fake
    score's pass conditioned as the discriminator's passes are (the prompts, or "" when kappa1 = 0), added to
    the same call when kappa2's passes lack it."""
    x_s = (1 - s[:, None, None]) * x_g + s[:, None, None] * eps
    v_r, _ = run_passes(teacher, kappa_passes(x_s, s, config.kappa4, cond, empty), config.teacher_guidance, img_ids)
    passes = kappa_passes(x_s, s, config.kappa2, cond, empty)
    n_guided, gan_pass = len(passes), None
    if gan_mix > 0:
        on_prompts = config.kappa1 != 0  # how the discriminator's passes are conditioned
        gan_pass = pass_index(config.kappa2, on_prompts)
        if gan_pass is None:
            passes += kappa_passes(x_s, s, 1.0 if on_prompts else 0.0, cond, empty)
            gan_pass = n_guided
    outputs, features = run_passes(fake, passes, config.fake_guidance, img_ids, capture=gan_pass is not None)
    y_r = x0_from_velocity(x_s, s, combine(v_r, config.kappa4))
    y_f = x0_from_velocity(x_s, s, combine(outputs[:n_guided], config.kappa2))
    ok = finite_samples(y_r) & finite_samples(y_f)
    logits = discriminator_logits(features[gan_pass])[ok] if gan_pass is not None else None
    loss, logs = generator_loss(x_g[ok], s[ok], y_r[ok], y_f[ok], config, gan_mix, logits,
                                batch_size=batch_size or len(x_g))
    return loss, {**logs, "dropped_predictions": float((~ok).sum())}


def gan_schedule(images_seen: int, config: SiDConfig) -> tuple[bool, float]:
    """(update the generator?, weight of L_adv) after `images_seen` generated images (METHODS 7.6)."""
    if not config.gan:
        return True, 0.0
    if images_seen < config.gan_generator_start_images:
        return False, 0.0
    return True, 0.5 if images_seen >= config.gan_adv_start_images else 0.0


def finite_samples(x: Tensor) -> Tensor:
    """[B] bool: samples without NaN or inf (the others are dropped from the losses and counted, METHODS 7.3)."""
    return torch.isfinite(x.detach()).flatten(1).all(1)
