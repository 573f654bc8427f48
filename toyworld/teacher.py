"""The toy teacher: a small FLUX-architecture pipeline trained on the toy world, saved as a diffusers folder.

Components are those of FLUX at a small size (model.tiny_flux.build_components): CLIP + T5 text encoders
(random, frozen: the transformer learns to read them), a 16-channel x8 AutoencoderKL trained here on the
world's images, and a FluxTransformer2DModel with FLUX's x1000 time and guidance inputs, trained here:

1. flow matching on the world (x_tau = (1 - tau) x0 + tau eps, target eps - x0, 10% of captions dropped to
   the " " prompt, guidance input drawn at random and ignored);
2. guidance distillation, as FLUX was made: the model fed g learns v_u + g (v_c - v_u) of the stage-1 model.

The result loads through the same code as FLUX.1-lite-8B (`--pretrained_model_name_or_path DIR`); nothing in
the distillation code knows it is a toy.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.conventions import flux_mu, shift_times
from model.latents import image_ids, pack_latents
from model.text import PromptEmbeds, encode_prompts
from model.tiny_flux import TinyFluxSize, build_components
from model.transformer import flux_velocity

from .world import training_example

NEGATIVE_PROMPT = " "


@dataclass
class ToyTeacherConfig:
    resolution: int = 64
    num_images: int = 20000
    seed: int = 0
    max_sequence_length: int = 12  # the longest caption is 11 T5 tokens with </s>
    # architecture (FLUX layout at a small size)
    num_layers: int = 2
    num_single_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: tuple = (8, 12, 12)
    text_dim: int = 64
    vae_channels: tuple = (16, 32, 32, 32)
    # training
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is convolutional: it trains on random crops, 4x cheaper at 64 px
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    flow_steps: int = 8000
    guidance_steps: int = 800
    batch: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # the saved transformer is the EMA of its training weights (0 disables)
    guidance_range: tuple = (1.0, 6.0)

    def dims(self) -> TinyFluxSize:
        return TinyFluxSize(self.num_layers, self.num_single_layers, self.num_attention_heads,
                            self.attention_head_dim, tuple(self.axes_dims_rope), self.text_dim,
                            tuple(self.vae_channels))


def render_training_set(config: ToyTeacherConfig) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] [N, 3, R, R] and their captions."""
    images, captions = [], []
    for i in range(config.num_images):
        metadata, image = training_example(i, config.seed, config.resolution)
        images.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1))
        captions.append(metadata["prompt"])
    return torch.stack(images) / 127.5 - 1.0, captions


def _log(log, msg: str) -> None:
    if log:
        log(msg)


def _random_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    if size >= x.shape[-1]:
        return x
    top, left = (torch.randint(0, (x.shape[-1] - size) // 8 + 1, (2,), generator=generator) * 8).tolist()
    return x[..., top:top + size, left:left + size]


def train_vae(vae, images: torch.Tensor, config: ToyTeacherConfig, generator: torch.Generator, log=print):
    """Reconstruction + a small KL; then set shift/scale so that normalised latents have mean 0 and std 1."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.vae_steps)
    vae.train()
    for step in range(config.vae_steps):
        idx = torch.randint(0, len(images), (config.vae_batch,), generator=generator)
        x = _random_crops(images[idx], config.vae_crop, generator)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == config.vae_steps - 1:
            _log(log, f"vae step {step}: mse {F.mse_loss(recon, x).item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    shift, std = means.mean().item(), means.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return (means - shift) / std


@torch.no_grad()
def encode_captions(components: dict, captions: list[str], max_sequence_length: int) -> dict[str, PromptEmbeds]:
    unique = sorted(set(captions) | {NEGATIVE_PROMPT})
    out = {}
    for i in range(0, len(unique), 256):
        chunk = unique[i:i + 256]
        emb = encode_prompts(chunk, components["tokenizer"], components["text_encoder"], components["tokenizer_2"],
                             components["text_encoder_2"], max_sequence_length, "cpu")
        for j, caption in enumerate(chunk):
            out[caption] = emb.index(slice(j, j + 1))
    return out


def _draw(x0, config: ToyTeacherConfig, generator):
    batch = x0.shape[0]
    tau = shift_times(torch.sigmoid(torch.randn(batch, generator=generator)), flux_mu(x0.shape[1]))
    eps = torch.randn(x0.shape, generator=generator)
    lo, hi = config.guidance_range
    g = lo + (hi - lo) * torch.rand(batch, generator=generator)
    return tau, eps, g


def train_transformer(transformer, latents: torch.Tensor, captions: list[str], text: dict[str, PromptEmbeds],
                      config: ToyTeacherConfig, generator: torch.Generator, log=print, snapshot=None,
                      snapshot_every: int = 1000) -> dict:
    """Stage 1 (conditional flow matching with caption dropout), then stage 2 (guidance distillation).

    `snapshot(stage, step, state_dict)`, if given, receives the EMA weights every `snapshot_every` steps
    (to follow quality during a long build).
    """
    h, w = latents.shape[-2:]
    x_all = pack_latents(latents)
    ids = image_ids(h, w)
    neg = text[NEGATIVE_PROMPT]
    history = {}

    def batch_cond(idx, drop):
        return PromptEmbeds.cat([neg if d else text[captions[i]] for i, d in zip(idx.tolist(), drop.tolist())])

    def run(stage, steps, loss_fn):
        optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
        losses = []
        names, params = zip(*[(n, p) for n, p in transformer.named_parameters() if p.requires_grad])
        ema = [p.detach().clone() for p in params]
        start = time.perf_counter()
        for step in range(steps):
            idx = torch.randint(0, len(x_all), (config.batch,), generator=generator)
            loss = loss_fn(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # EMA with the usual warm-up: decay min(d, (1 + step) / (10 + step))
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            losses.append(loss.item())
            if snapshot and (step + 1) % snapshot_every == 0:
                state = {**transformer.state_dict(), **dict(zip(names, ema))}
                snapshot(stage, step + 1, {k: v.detach().clone().contiguous() for k, v in state.items()})
            if step % 250 == 0 or step == steps - 1:
                _log(log, f"{stage} step {step}: loss {np.mean(losses[-250:]):.4f} "
                          f"({time.perf_counter() - start:.0f} s)")
        if config.ema_decay and steps:
            with torch.no_grad():
                for p, e in zip(params, ema):
                    p.copy_(e)
        history[stage] = losses

    def flow_loss(idx):
        x0 = x_all[idx]
        tau, eps, g = _draw(x0, config, generator)
        drop = torch.rand(len(idx), generator=generator) < config.caption_dropout
        x = (1 - tau[:, None, None]) * x0 + tau[:, None, None] * eps
        return F.mse_loss(flux_velocity(transformer, x, tau, g, batch_cond(idx, drop), ids), eps - x0)

    transformer.train()
    run("flow", config.flow_steps, flow_loss)
    if config.guidance_steps:
        frozen = copy.deepcopy(transformer).eval().requires_grad_(False)

        def guidance_loss(idx):
            x0 = x_all[idx]
            tau, eps, g = _draw(x0, config, generator)
            x = (1 - tau[:, None, None]) * x0 + tau[:, None, None] * eps
            cond = batch_cond(idx, torch.zeros(len(idx), dtype=torch.bool))
            uncond = batch_cond(idx, torch.ones(len(idx), dtype=torch.bool))
            with torch.no_grad():
                v_c = flux_velocity(frozen, x, tau, g, cond, ids)
                v_u = flux_velocity(frozen, x, tau, g, uncond, ids)
            return F.mse_loss(flux_velocity(transformer, x, tau, g, cond, ids), v_u + g[:, None, None] * (v_c - v_u))

        run("guidance", config.guidance_steps, guidance_loss)
    transformer.eval().requires_grad_(False)
    return {stage: float(np.mean(v[-100:])) for stage, v in history.items()}


def build_toy_teacher(output_dir: str | Path, config: ToyTeacherConfig | None = None, log=print,
                      snapshot=None, snapshot_every: int = 1000) -> Path:
    """Render the world, train the VAE and the transformer, and save the FLUX pipeline folder."""
    from diffusers import FluxPipeline

    config = config or ToyTeacherConfig()
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    components = build_components(config.dims(), config.seed)
    images, captions = render_training_set(config)
    _log(log, f"rendered {len(images)} training images ({time.perf_counter() - start:.0f} s)")
    latents = train_vae(components["vae"], images, config, generator, log)
    text = encode_captions(components, captions, config.max_sequence_length)
    final_losses = train_transformer(components["transformer"], latents, captions, text, config, generator, log,
                                     snapshot, snapshot_every)
    FluxPipeline(**components).save_pretrained(output_dir, safe_serialization=True)
    summary = {"config": asdict(config), "final_losses": final_losses, "seconds": time.perf_counter() - start}
    (output_dir / "toy_teacher.json").write_text(json.dumps(summary, indent=1))
    _log(log, f"toy teacher saved to {output_dir} ({summary['seconds']:.0f} s)")
    return output_dir
