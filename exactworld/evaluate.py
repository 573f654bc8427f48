"""Sampling and scoring in the exact world, through the project's own pipelines' sampling loops.

Each sampler is the `denoise` method of the FLUX pipeline class a FLUX run samples with (`FluxEulerPipeline`,
`FluxSCMPipeline`, `FluxMeanFlowPipeline`, `FluxSiDPipeline`), on a "headless" pipeline that holds only the
network and FLUX's scheduler config (no VAE or text encoders: the world's latents are its samples).

Noise protocol: `References` holds two solutions of the teacher's ODE (256 Euler steps on FLUX's schedule) from
two independent noise seeds, A and B. Every model is sampled from seed B's noise. Its distance is measured
against A (independent noise, so the floor is distance(B-reference, A-reference), the metric's own noise at this
sample size); its per-sample error against the B-reference (the ODE solution from the same initial noise; for
deterministic samplers only: Euler, MeanFlow, 1-step sCM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from model.pipeline import FluxEulerPipeline, FluxMeanFlowPipeline, FluxSCMPipeline, FluxSiDPipeline
from training.checkpoint import read_export_metadata

from .networks import ExactTeacher, ExactWorldNet
from .world import GaussianMixtureWorld, evaluate_samples, per_sample_error, sw_directions

REFERENCE_STEPS = 256
SEED_A, SEED_B = 1, 2
PIPELINES = {"euler": FluxEulerPipeline, "scm": FluxSCMPipeline, "meanflow": FluxMeanFlowPipeline,
             "sid": FluxSiDPipeline}


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX's scheduler config (dynamic shifting, mu from 0.5 at 256 tokens to 1.15 at 4096)."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def headless_pipeline(sampler: str, transformer, export: str | Path | None = None):
    """The pipeline class of `sampler` around `transformer`, without VAE or text encoders (only `denoise` is
    used); a SiD export's sampling settings (K, t_init, shift, noise type) are read from its folder."""
    cls = PIPELINES[sampler]
    pipe = cls(scheduler=flux_scheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
               tokenizer_2=None, transformer=transformer)
    if sampler == "sid":
        meta = read_export_metadata(export) if export is not None else {}
        pipe.configure_generator(meta.get("noise_type"), meta.get("init_time"), meta.get("time_shift"),
                                 meta.get("train_steps"))
    return pipe


@torch.no_grad()
def sample(world: GaussianMixtureWorld, pipe, ids: torch.Tensor, steps: int, seed: int,
           guidance: float | None = None, chunk: int = 4096) -> torch.Tensor:
    """Samples [N, L, C] of prompts `ids` with `pipe.denoise` in `steps` steps; noise from one generator seeded
    with `seed` (the first draw is the initial noise, later draws are re-noising, as the pipelines do)."""
    guidance = world.config.guidance if guidance is None else guidance
    out = []
    gen = torch.Generator().manual_seed(seed)
    tokens = world.config.num_tokens
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        cond = world.encode_ids(part)
        model_kwargs = {"encoder_hidden_states": cond.prompt_embeds, "pooled_projections": cond.pooled_prompt_embeds,
                        "txt_ids": cond.text_ids, "img_ids": torch.zeros(tokens, 3)}

        def fresh_noise(_step: int = 0, n=len(part)):
            return torch.randn(world.latent_shape(n), generator=gen)

        g = torch.full((len(part),), float(guidance))
        out.append(pipe.denoise(fresh_noise(), model_kwargs, steps, g, fresh_noise))
    return torch.cat(out)


@dataclass
class References:
    """The teacher ODE's solutions from seeds A and B, for prompts `ids` (see the module docstring)."""

    ids: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    directions: torch.Tensor

    @classmethod
    def make(cls, world: GaussianMixtureWorld, per_prompt: int, steps: int = REFERENCE_STEPS) -> "References":
        ids = torch.arange(world.config.num_prompts).repeat_interleave(per_prompt)
        pipe = headless_pipeline("euler", ExactTeacher(world))
        return cls(ids, sample(world, pipe, ids, steps, SEED_A), sample(world, pipe, ids, steps, SEED_B),
                   sw_directions(world.config.dim))

    def floor(self, world: GaussianMixtureWorld) -> dict:
        return evaluate_samples(world, self.b, self.ids, self.a, self.directions)

    def score(self, world: GaussianMixtureWorld, samples: torch.Tensor, paired: bool) -> dict:
        row = evaluate_samples(world, samples, self.ids, self.a, self.directions)
        row["per_sample_error"] = per_sample_error(samples, self.b) if paired else None
        return row


def load_export(path: str | Path) -> ExactWorldNet:
    return ExactWorldNet.from_pretrained(str(path)).float().eval()


DETERMINISTIC = {"euler", "meanflow"}  # sCM is deterministic at 1 step only; SiD re-noises with fresh noise


def score_model(world: GaussianMixtureWorld, refs: References, sampler: str, transformer, steps: list[int],
                export: str | Path | None = None, **row) -> list[dict]:
    """One row per step count: {**row, sampler, nfe, distance, mode_accuracy, mode_tv, mode_tv_true,
    per_sample_error}."""
    pipe = headless_pipeline(sampler, transformer, export)
    rows = []
    for n in steps:
        samples = sample(world, pipe, refs.ids, n, SEED_B)
        paired = sampler in DETERMINISTIC or (sampler == "scm" and n == 1)
        rows.append({**row, "sampler": sampler, "nfe": n, **refs.score(world, samples, paired)})
    return rows
