"""Teacher rescaling (METHODS 2.2, 10): distil the x1000 FLUX transformer into an identical x1 one.

The x1 student takes flow time tau and guidance g as they are; the frozen x1000 teacher multiplies them by
1000 inside. Both see the same x_tau = (1 - tau) x0 + tau eps, tau and g; the loss is a smooth-L1 (the paper)
or MSE distance between their velocities. Also here: the frequency-remapped initialisation, the time
mixture, and the agreement metrics reported by train_rescale.py --eval_only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from common.cli import UsageError
import torch.nn.functional as F

from .conventions import flow_interpolate, flux_mu, shift_times
from .text import PromptEmbeds
from .transformer import TIME_EMBED_DIM, flux_velocity

TIME_COMPONENTS = ("logit_normal", "shifted", "uniform")


@dataclass
class RescaleConfig:
    """Draws and distance of the self-distillation (defaults: METHODS 2.2's proposal)."""

    time_mixture: dict[str, float] = field(default_factory=lambda: {"logit_normal": 1.0, "shifted": 1.0,
                                                                    "uniform": 1.0})
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    prompt_dropout: float = 0.1
    loss: str = "smooth_l1"
    smooth_l1_beta: float = 0.05

    def __post_init__(self):
        unknown = set(self.time_mixture) - set(TIME_COMPONENTS)
        weights = list(self.time_mixture.values())
        if unknown or not weights or min(weights) < 0 or not sum(weights):
            raise UsageError(f"time mixture {self.time_mixture}: use weights >= 0, not all 0, for {TIME_COMPONENTS}")
        if self.loss not in ("smooth_l1", "mse"):
            raise UsageError(f"loss {self.loss!r}: use smooth_l1 or mse")
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise UsageError("need 0 <= guidance_min <= guidance_max")


def sample_flow_times(batch: int, image_seq_len: int, config: RescaleConfig, generator: torch.Generator) -> torch.Tensor:
    """tau in (0, 1), fp32: per sample one component of the mixture (logit-normal(0, 1), the same shifted by
    FLUX's mu(L) as its sampler is, or uniform), chosen with the configured weights."""
    names = list(config.time_mixture)
    weights = torch.tensor([config.time_mixture[n] for n in names], dtype=torch.float32)
    which = torch.multinomial(weights, batch, replacement=True, generator=generator)
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator))
    uniform = torch.rand(batch, generator=generator).clamp(1e-4, 1 - 1e-4)
    choices = {"logit_normal": logit_normal, "shifted": shift_times(logit_normal, flux_mu(image_seq_len)),
               "uniform": uniform}
    stacked = torch.stack([choices[n] for n in names], dim=1)
    return stacked.gather(1, which[:, None]).squeeze(1)


@torch.no_grad()
def remapped_embedder_input(weight: torch.Tensor, bias: torch.Tensor, lo: float, hi: float,
                            scale: float = 1000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_1 of a time (or guidance) embedder re-indexed from x`scale` inputs to x1 inputs (METHODS 2.2).

    The features are phi(x)_k = cos(x w_k), sin(x w_k) with w_k = 10000^(-k/128). Since 1000 = 10000^(3/4),
    1000 w_k = w_(k-96): the x1000 channel k at x equals the x1 channel k - 96 at x. Those columns move over
    unchanged; the 96 fastest x1000 channels have no x1 counterpart, so their columns are dropped and their
    mean over inputs uniform in [lo, hi] is added to the bias (the x1 channels of frequency ~0 are constant).
    """
    half = TIME_EMBED_DIM // 2
    shift = round(math.log(scale) / math.log(10000.0) * half)
    if not math.isclose(10000.0 ** (shift / half), scale, rel_tol=1e-6):
        raise ValueError(f"scale {scale} is not a power 10000^(k/{half}); no exact re-indexing exists")
    w = weight.double()
    new_w = torch.zeros_like(w)
    new_w[:, : half - shift] = w[:, shift:half]  # cos
    new_w[:, half: 2 * half - shift] = w[:, half + shift:]  # sin
    freqs = torch.exp(-math.log(10000.0) * torch.arange(shift, dtype=torch.float64) / half) * scale
    a, b = freqs * lo, freqs * hi
    mean_cos = (torch.sin(b) - torch.sin(a)) / (b - a) if hi > lo else torch.cos(a)
    mean_sin = (torch.cos(a) - torch.cos(b)) / (b - a) if hi > lo else torch.sin(a)
    new_b = bias.double() + w[:, :shift] @ mean_cos + w[:, half: half + shift] @ mean_sin
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


@torch.no_grad()
def remap_initialisation(student, guidance_range: tuple[float, float]) -> None:
    """Apply `remapped_embedder_input` to the time (tau in [0, 1]) and guidance embedders of an x1 student."""
    emb = student.time_text_embed
    for embedder, (lo, hi) in ((emb.timestep_embedder, (0.0, 1.0)), (emb.guidance_embedder, guidance_range)):
        weight, bias = remapped_embedder_input(embedder.linear_1.weight, embedder.linear_1.bias, lo, hi)
        embedder.linear_1.weight.copy_(weight)
        embedder.linear_1.bias.copy_(bias)


def rescale_loss(student, teacher, x0, cond: PromptEmbeds, neg_cond: PromptEmbeds, img_ids, config: RescaleConfig,
                 generator: torch.Generator):
    """(loss, logs): distance between v_x1(x_tau, tau, g) and sg(v_x1000(x_tau, tau, g)) on data latents x0."""
    batch = x0.shape[0]
    tau = sample_flow_times(batch, x0.shape[1], config, generator)
    g = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(batch, generator=generator)
    dropped = torch.rand(batch, generator=generator) < config.prompt_dropout
    eps = torch.randn(x0.shape, generator=generator)
    tau, g, eps = tau.to(x0.device), g.to(x0.device), eps.to(x0.device)
    cond = cond.where(dropped, neg_cond)
    x = flow_interpolate(x0.float(), eps, tau[:, None, None])
    with torch.no_grad():
        v_teacher = flux_velocity(teacher, x, tau, g, cond, img_ids)
    v = flux_velocity(student, x, tau, g, cond, img_ids)
    if config.loss == "mse":
        loss = F.mse_loss(v, v_teacher)
    else:
        loss = F.smooth_l1_loss(v, v_teacher, beta=config.smooth_l1_beta)
    rel = ((v.detach() - v_teacher).flatten(1).norm(dim=1) / v_teacher.flatten(1).norm(dim=1).clamp_min(1e-8))
    return loss, {"rel_velocity_error": rel.mean(), "tau_mean": tau.mean()}


@torch.no_grad()
def velocity_error_by_time(teacher, student, x0, cond: PromptEmbeds, img_ids, guidance: float,
                           generator: torch.Generator, buckets: int = 10) -> list[tuple[float, float, float]]:
    """Mean relative velocity error ||v_x1 - v_x1000|| / ||v_x1000|| per flow-time bucket: [(lo, hi, err)]."""
    rows = []
    batch = x0.shape[0]
    g = torch.full((batch,), guidance, device=x0.device)
    for i in range(buckets):
        lo, hi = i / buckets, (i + 1) / buckets
        tau = (lo + (hi - lo) * torch.rand(batch, generator=generator)).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        x = flow_interpolate(x0.float(), eps, tau[:, None, None])
        v_t = flux_velocity(teacher, x, tau, g, cond, img_ids)
        v_s = flux_velocity(student, x, tau, g, cond, img_ids)
        err = (v_s - v_t).flatten(1).norm(dim=1) / v_t.flatten(1).norm(dim=1).clamp_min(1e-8)
        rows.append((lo, hi, err.mean().item()))
    return rows


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = (a.float() - b.float()).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


@torch.no_grad()
def sample_agreement(teacher_pipe, student_pipe, prompts: list[str], resolution: int, steps: int = 28,
                     guidance: float = 3.5, seed: int = 0, max_sequence_length: int = 256) -> dict:
    """Same-noise Euler samples of the x1000 and x1 teachers: latent RMSE and decoded-image PSNR (peak 1)."""
    latents = []
    for pipe in (teacher_pipe, student_pipe):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        latents.append(pipe(prompt=prompts, height=resolution, width=resolution, num_inference_steps=steps,
                            guidance_scale=guidance, generator=gens, max_sequence_length=max_sequence_length,
                            output_type="latent").images)
    from .latents import decode_latents

    images = [(decode_latents(teacher_pipe.vae, lat).clamp(-1, 1) + 1) / 2 for lat in latents]
    rmse = (latents[0] - latents[1]).float().square().mean().sqrt().item()
    return {"latent_rmse": rmse, "latent_std": latents[0].float().std().item(),
            "image_psnr_db": psnr(images[0], images[1], 1.0), "steps": steps, "guidance": guidance}


def format_report(errors: list[tuple[float, float, float]], agreement: dict) -> str:
    lines = ["flow time      rel. velocity error (x1 vs x1000)"]
    lines += [f"[{lo:.1f}, {hi:.1f})     {err:.4f}" for lo, hi, err in errors]
    lines.append(f"{agreement['steps']}-step samples, same noise, g={agreement['guidance']}: latent RMSE "
                 f"{agreement['latent_rmse']:.4f} (latent std {agreement['latent_std']:.3f}), "
                 f"image PSNR {agreement['image_psnr_db']:.2f} dB")
    return "\n".join(lines)
