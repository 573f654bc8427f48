"""The toy teacher: a small FLUX-architecture pipeline trained on the toy world, saved as a diffusers folder.

Components are those of FLUX at a small size (model.tiny_flux.build_components): CLIP + T5 text encoders, a
16-channel x8 AutoencoderKL and a FluxTransformer2DModel with FLUX's x1000 time and guidance inputs. Stages:

1. VAE: reconstruction + a small KL on the world's images; shift/scale set so latents have mean 0, std 1.
   (text, with `text_pretrain_steps`: the encoders learn to read the captions: each T5 token the object its word
   describes, the pooled CLIP vector the whole scene, through linear read-outs dropped afterwards; then frozen.)
2. flow: conditional flow matching (x_tau = (1 - tau) x0 + tau eps, target eps - x0, 10% of captions dropped
   to the " " prompt, the guidance input drawn at random and ignored). The text encoders train with the
   transformer here (`train_text_encoders`), since FLUX's encoders arrive pretrained and random ones leave the
   transformer to decode colour-object binding from noise; they are frozen from then on, as FLUX's are.
3. guidance: guidance distillation, as FLUX was made: the model fed g learns v_u + g (v_c - v_u) of the
   stage-2 model.

The build is resumable: `<output_dir>/build/` holds the VAE stage's result and, every `checkpoint_every` steps,
the state of the running stage (weights, optimiser, LR schedule, EMA, random streams, step), written
atomically; rerunning the same build continues exactly where it stopped (a build stopped halfway and rerun
equals one straight build, tested). The result loads through the same code as FLUX.1-lite-8B
(`--pretrained_model_name_or_path DIR`); nothing in the distillation code knows it is a toy.

    python -m toyworld.teacher --output_dir outputs/toy_teacher [--preset full|quick|smoke]
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.conventions import flux_mu, shift_times
from model.latents import image_ids, normalize_latents, pack_latents
from model.text import PromptEmbeds
from model.tiny_flux import TinyFluxSize, build_components
from model.transformer import flux_velocity
from training.checkpoint import atomic_torch_save, atomic_write_text

from .captions import object_descriptions, word_objects
from .world import COLORS, NUMBER_WORDS, RELATIONS, SHAPES, TAGS, draw, training_example, training_layout

NEGATIVE_PROMPT = " "
BUILD_DIR = "build"
SUMMARY = "toy_teacher.json"
CYCLE_KEYS = ("cycle_steps", "cycle_lr")
CLI_SETTINGS = ("seed", "text_pretrain_steps", "flow_steps", "flow_cycles", "cycle_steps", "cycle_lr",
                "reading_order_from_cycle", "guidance_steps")  # main()'s flags
UNORDERED_PAIRS = ("two_object", "color_attr")  # captions naming two objects whose prompt places neither


@dataclass
class ToyTeacherConfig:
    resolution: int = 64
    num_images: int = 40000
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
    flow_steps: int = 16000
    # further cosine cycles of the flow stage (warm restarts), each from the previous cycle's EMA with a fresh
    # optimiser: `cycle_steps` steps (0: flow_steps) at peak `cycle_lr`. A finished build can be given more
    # cycles (rerun with a larger --flow_cycles): it continues from its flow stage and guidance-distils again.
    flow_cycles: int = 1
    cycle_steps: int = 0
    cycle_lr: float = 5e-4
    guidance_steps: int = 1000
    batch: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # the saved transformer (and encoders) are the EMA of their training weights
    guidance_range: tuple = (1.0, 6.0)
    train_text_encoders: bool = True  # in the flow stage; frozen afterwards
    # pretraining of the text encoders on the world's captions before the flow stage (0: none): every token learns
    # to describe the object its word belongs to (shape, colour, count, relation to the other object) and the
    # pooled CLIP vector the whole scene, as a real FLUX's pretrained encoders bind words in context
    text_pretrain_steps: int = 0
    text_pretrain_lr: float = 1e-3
    # from this flow cycle on (0: never), the images of "a X and a Y" captions (two objects, colour attribution)
    # show X left of Y: captions name such objects in reading order, so the word order tells the sample which
    # shape goes where (the prompt grammar, the captions and the evaluation are unchanged)
    reading_order_from_cycle: int = 0
    checkpoint_every: int = 500  # steps between resumable checkpoints of a running stage

    def dims(self) -> TinyFluxSize:
        return TinyFluxSize(self.num_layers, self.num_single_layers, self.num_attention_heads,
                            self.attention_head_dim, tuple(self.axes_dims_rope), self.text_dim,
                            tuple(self.vae_channels))

    def identity(self) -> dict:
        """The settings that define the result (checkpoint_every does not), for refusing a mixed-up resume."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k != "checkpoint_every"}


def _model_range(image: Image.Image) -> np.ndarray:
    """An RGB image as a [3, R, R] float32 array in [-1, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def posterior_means(vae, images: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior means of `images` ([-1, 1]), 256 at a time."""
    with torch.no_grad():
        return torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])


def normalised_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The latents the flow stage trains on: posterior means with the VAE's shift and scale (set by train_vae)."""
    return normalize_latents(posterior_means(vae, images), vae.config)


def render_training_set(config: ToyTeacherConfig) -> tuple[torch.Tensor, list[dict]]:
    """Images in [-1, 1] [N, 3, R, R] and their GenEval metadata (the caption is its "prompt")."""
    images = np.empty((config.num_images, 3, config.resolution, config.resolution), dtype=np.float32)
    metadata = []
    for i in range(config.num_images):
        example, image = training_example(i, config.seed, config.resolution)
        images[i] = _model_range(image)
        metadata.append(example)
    return torch.from_numpy(images), metadata


def reading_order_example(index: int, seed: int = 0, resolution: int = 64) -> tuple[dict, Image.Image, bool]:
    """world.training_example(index, seed, resolution), except that an image of an `UNORDERED_PAIRS` caption whose
    first-named object lies right of the second is mirrored left to right (a mirrored layout keeps every border
    and gap). Returns (metadata, image, mirrored)."""
    metadata, placed = training_layout(index, seed, resolution)
    mirrored = metadata["tag"] in UNORDERED_PAIRS and placed[0].cx > placed[1].cx
    if mirrored:
        placed = [replace(obj, cx=resolution - obj.cx) for obj in placed]
    return metadata, draw(placed, resolution), mirrored


def reading_order_latents(vae, latents: torch.Tensor, config: ToyTeacherConfig) -> torch.Tensor:
    """The normalised latents of the training set with its `UNORDERED_PAIRS` images in reading order: the mirrored
    images encoded by the trained VAE (posterior mean, its shift and scale), the others unchanged."""
    ordered = latents.clone()
    mirrored = []
    pairs = [i for i in range(config.num_images) if TAGS[i % len(TAGS)] in UNORDERED_PAIRS]  # tags cycle by index
    for i in pairs:
        _, image, flipped = reading_order_example(i, config.seed, config.resolution)
        if flipped:
            mirrored.append((i, _model_range(image)))
    if mirrored:
        index = torch.tensor([i for i, _ in mirrored])
        ordered[index] = normalised_latents(vae, torch.from_numpy(np.stack([x for _, x in mirrored])))
    return ordered


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
    means = posterior_means(vae, images)
    shift, std = means.mean().item(), means.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return (means - shift) / std


class CaptionEncoder:
    """FLUX's prompt encoding (CLIP pooled at 77 tokens + T5 sequence) over a fixed caption vocabulary, with
    gradients when the encoders train; captions are tokenised once, and encoded once when frozen (`freeze`)."""

    def __init__(self, components: dict, captions: list[str], max_sequence_length: int):
        self.text_encoder, self.text_encoder_2 = components["text_encoder"], components["text_encoder_2"]
        self.unique = sorted(set(captions) | {NEGATIVE_PROMPT})
        self.index = {caption: i for i, caption in enumerate(self.unique)}
        tokenizer, tokenizer_2 = components["tokenizer"], components["tokenizer_2"]
        self.tokenizer_2 = tokenizer_2
        self.clip_ids = tokenizer(self.unique, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        self.t5_ids = tokenizer_2(self.unique, padding="max_length", max_length=max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        self.text_ids = torch.zeros(max_sequence_length, 3)
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None

    def encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 sequence [n, L, d], CLIP pooled [n, d]) of the unique captions `rows`."""
        return self.text_encoder_2(self.t5_ids[rows])[0], self.text_encoder(self.clip_ids[rows]).pooler_output

    def freeze(self) -> None:
        """Stop the encoders' training and encode every caption once; later calls read the table (and a second
        freeze keeps it)."""
        if self.table is not None:
            return
        for encoder in self.encoders():
            encoder.requires_grad_(False)
        with torch.no_grad():
            self.table = self.encode(torch.arange(len(self.unique)))

    def rows(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in captions])

    def __call__(self, captions: list[str]) -> PromptEmbeds:
        rows = self.rows(captions)
        if self.table is not None:
            sequence, pooled = self.table
            return PromptEmbeds(sequence[rows], pooled[rows], self.text_ids)
        needed, inverse = torch.unique(rows, return_inverse=True)
        sequence, pooled = self.encode(needed)
        return PromptEmbeds(sequence[inverse], pooled[inverse], self.text_ids)


# What the text encoders are pretrained to read from a caption (text_pretrain_steps): the attributes of an object
ATTRIBUTES = {"shape": SHAPES, "color": (*COLORS, None), "count": tuple(NUMBER_WORDS), "relation": (None, *RELATIONS)}
MAX_OBJECTS = 2  # objects a caption of the world names (counting names one shape, with its number)
IGNORE = -100


def caption_targets(metadata: dict | None, tokenizer_2, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining targets of one caption (None: the empty prompt): per T5 token [L, 4] the attributes of the
    object its word describes (IGNORE for other tokens); for the pooled vector [1 + 2 * 4] the number of objects
    and each object's attributes in the order the caption names them (IGNORE for an object it does not have)."""
    tokens = torch.full((max_sequence_length, len(ATTRIBUTES)), IGNORE)
    pooled = torch.full((1 + MAX_OBJECTS * len(ATTRIBUTES),), IGNORE)
    objects = object_descriptions(metadata) if metadata else []
    pooled[0] = len(objects)
    codes = [[values.index(obj[name]) for name, values in ATTRIBUTES.items()] for obj in objects]
    for k, code in enumerate(codes):
        pooled[1 + k * len(ATTRIBUTES):1 + (k + 1) * len(ATTRIBUTES)] = torch.tensor(code)
    if metadata:
        position = 0
        for word, owner in zip(metadata["prompt"].split(), word_objects(metadata)):
            width = len(tokenizer_2(word, add_special_tokens=False).input_ids)
            if owner is not None:
                tokens[position:position + width] = torch.tensor(codes[owner])
            position += width
        whole = len(tokenizer_2(metadata["prompt"], add_special_tokens=False).input_ids)
        if whole != position:
            raise ValueError(f"caption {metadata['prompt']!r} is {whole} T5 tokens but its words are {position}: "
                             "its tokens cannot be matched to its words")
    return tokens, pooled


class CaptionProbe(torch.nn.Module):
    """Linear read-outs of the text encoders' outputs, used only to pretrain them (not part of the pipeline)."""

    def __init__(self, t5_dim: int, clip_dim: int):
        super().__init__()
        sizes = [len(values) for values in ATTRIBUTES.values()]
        self.token = torch.nn.ModuleList(torch.nn.Linear(t5_dim, n) for n in sizes)
        self.count = torch.nn.Linear(clip_dim, MAX_OBJECTS + 1)
        self.objects = torch.nn.ModuleList(torch.nn.Linear(clip_dim, n) for _ in range(MAX_OBJECTS) for n in sizes)

    def read(self, sequence, pooled, token_targets, pooled_targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, targets) of every read-out: the per-token ones, then the pooled ones."""
        out = [(head(sequence), token_targets[..., column]) for column, head in enumerate(self.token)]
        pooled_heads = [self.count, *self.objects]
        return out + [(head(pooled), pooled_targets[:, column]) for column, head in enumerate(pooled_heads)]

    def loss(self, *inputs) -> torch.Tensor:
        """Mean cross-entropy of the read-outs with any target (IGNORE marks none)."""
        terms = [F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=IGNORE)
                 for logits, target in self.read(*inputs) if (target != IGNORE).any()]
        return torch.stack(terms).mean()

    def accuracy(self, *inputs) -> float:
        """The share of all (caption, target) pairs the read-outs get right."""
        right = total = 0
        for logits, target in self.read(*inputs):
            keep = target != IGNORE
            right += int((logits.argmax(-1)[keep] == target[keep]).sum())
            total += int(keep.sum())
        return right / max(total, 1)


def _draw(x0, config: ToyTeacherConfig, generator):
    batch = x0.shape[0]
    tau = shift_times(torch.sigmoid(torch.randn(batch, generator=generator)), flux_mu(x0.shape[1]))
    eps = torch.randn(x0.shape, generator=generator)
    lo, hi = config.guidance_range
    g = lo + (hi - lo) * torch.rand(batch, generator=generator)
    return tau, eps, g


class StageRunner:
    """One training stage with EMA, resumable from `<build>/<stage>.pt` (written every `checkpoint_every` steps)."""

    def __init__(self, build: Path, config: ToyTeacherConfig, generator: torch.Generator, num_examples: int,
                 snapshot_modules: list[torch.nn.Module], log, snapshot, snapshot_every: int,
                 stop_after: int | None):
        self.build, self.config, self.generator, self.log = build, config, generator, log
        self.num_examples, self.snapshot_modules = num_examples, snapshot_modules
        self.snapshot, self.snapshot_every, self.stop_after = snapshot, snapshot_every, stop_after
        self.steps_run = 0  # training steps taken by this invocation (all stages)

    def run(self, stage: str, steps: int, modules: list[torch.nn.Module], loss_fn,
            lr: float | None = None, snapshots: bool = True) -> tuple[list[float], bool]:
        """Train the parameters of `modules` for `steps` steps of `loss_fn(idx)` (peak `lr`, default the
        config's; 100 warm-up steps, cosine to 0; EMA snapshots unless `snapshots` is False); returns (losses,
        finished)."""
        config = self.config
        params = [p for module in modules for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr if lr is None else lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
        ema = [p.detach().clone() for p in params]
        losses: list[float] = []
        start_step = 0
        path = self.build / f"{stage}.pt"
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            with torch.no_grad():
                for p, v in zip(params, state["params"]):
                    p.copy_(v)
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            ema = list(state["ema"])
            losses = list(state["losses"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start_step = state["step"]
            _log(self.log, f"{stage}: resuming at step {start_step} of {steps}")

        def save(step: int) -> None:
            atomic_torch_save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                          "schedule": schedule.state_dict(), "ema": ema, "losses": losses, "step": step,
                          "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}, path)

        start = time.perf_counter()
        for step in range(start_step, steps):
            idx = torch.randint(0, self.num_examples, (config.batch,), generator=self.generator)
            loss = loss_fn(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # EMA with the usual warm-up: decay min(d, (1 + step) / (10 + step))
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            losses.append(loss.item())
            done = step + 1
            if snapshots and self.snapshot and done % self.snapshot_every == 0:
                self.snapshot(stage, done, self.ema_state_dicts(params, ema))
            if step % 250 == 0 or done == steps:
                _log(self.log, f"{stage} step {step}: loss {np.mean(losses[-250:]):.4f} "
                               f"({time.perf_counter() - start:.0f} s)")
            if done % config.checkpoint_every == 0 or done == steps:
                save(done)
            self.steps_run += 1
            if self.stop_after is not None and self.steps_run >= self.stop_after and done < steps:
                save(done)
                _log(self.log, f"{stage}: stopped at step {done} (rerun to continue)")
                return losses, False
        if config.ema_decay and steps:
            with torch.no_grad():
                for p, e in zip(params, ema):
                    p.copy_(e)
        return losses, True

    def ema_state_dicts(self, params, ema) -> list[dict[str, torch.Tensor]]:
        """The state dicts of the snapshot modules, with every trained parameter replaced by its EMA."""
        average = {id(p): e for p, e in zip(params, ema)}
        out = []
        for module in self.snapshot_modules:
            state = {name: average.get(id(v), v) for name, v in module.state_dict(keep_vars=True).items()}
            out.append({k: v.detach().clone().contiguous() for k, v in state.items()})
        return out


def pretrain_text_encoders(text: CaptionEncoder, metadata: list[dict], config: ToyTeacherConfig,
                           runner: StageRunner) -> tuple[list[float], float | None]:
    """The text stage: the encoders learn to read the world's captions (`caption_targets`, through linear read-outs
    that are then dropped), on the training examples' captions (`caption_dropout` of them the empty prompt).
    Returns (losses, accuracy of the read-outs over every caption) or (losses, None) when stopped early."""
    by_caption = {m["prompt"]: m for m in metadata}
    targets = [caption_targets(by_caption.get(c), text.tokenizer_2, config.max_sequence_length) for c in text.unique]
    token_targets, pooled_targets = (torch.stack(t) for t in zip(*targets))
    example_rows = text.rows([m["prompt"] for m in metadata])
    empty = text.index[NEGATIVE_PROMPT]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        probe = CaptionProbe(text.text_encoder_2.config.d_model, text.text_encoder.config.hidden_size)
    for encoder in text.encoders():
        encoder.eval().requires_grad_(True)  # eval(): no dropout, so the build is deterministic

    def loss_fn(idx):
        drop = torch.rand(len(idx), generator=runner.generator) < config.caption_dropout
        rows = torch.where(drop, empty, example_rows[idx])
        return probe.loss(*text.encode(rows), token_targets[rows], pooled_targets[rows])

    losses, finished = runner.run("text", config.text_pretrain_steps, [*text.encoders(), probe], loss_fn,
                                  lr=config.text_pretrain_lr, snapshots=False)
    if not finished:
        return losses, None
    with torch.no_grad():
        accuracy = probe.accuracy(*text.encode(torch.arange(len(text.unique))), token_targets, pooled_targets)
    return losses, accuracy


def train_transformer(components: dict, latents: torch.Tensor, metadata: list[dict], config: ToyTeacherConfig,
                      generator: torch.Generator, build: Path, log=print, snapshot=None, snapshot_every: int = 1000,
                      stop_after: int | None = None, ordered_latents: torch.Tensor | None = None
                      ) -> tuple[dict, float | None] | None:
    """The text stage (if `text_pretrain_steps`), stage 2 (flow matching, encoders trained with the transformer
    unless pretrained and frozen) and stage 3 (guidance distillation).

    `snapshot(stage, step, [transformer, text_encoder, text_encoder_2 state dicts])`, if given, receives the
    EMA weights every `snapshot_every` steps (to follow quality during a long build). `ordered_latents` (the
    training set in reading order, see `reading_order_latents`) replace `latents` from cycle
    `config.reading_order_from_cycle` on, and in the guidance stage after it. Returns the final
    losses and the text stage's read-out accuracy (None without it), or None when `stop_after` (training steps of
    this call) stopped the build early.
    """
    transformer = components["transformer"]
    h, w = latents.shape[-2:]
    data = {"x": pack_latents(latents)}  # the training latents of the running cycle

    def use_cycle_data(cycle: int) -> None:
        if config.reading_order_from_cycle and cycle >= config.reading_order_from_cycle:
            data["x"] = pack_latents(ordered_latents)

    ids = image_ids(h, w)
    captions = [m["prompt"] for m in metadata]
    text = CaptionEncoder(components, captions, config.max_sequence_length)
    runner = StageRunner(build, config, generator, len(data["x"]), [transformer, *text.encoders()], log, snapshot,
                         snapshot_every, stop_after)
    history = {}
    text_accuracy = None
    if config.text_pretrain_steps:
        history["text"], text_accuracy = pretrain_text_encoders(text, metadata, config, runner)
        if text_accuracy is None:
            return None
        _log(log, f"text encoders pretrained: read-out accuracy {text_accuracy:.4f} over {len(text.unique)} captions")

    def batch_captions(idx, drop):
        return [NEGATIVE_PROMPT if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]

    def flow_loss(idx):
        x0 = data["x"][idx]
        tau, eps, g = _draw(x0, config, generator)
        drop = torch.rand(len(idx), generator=generator) < config.caption_dropout
        x = (1 - tau[:, None, None]) * x0 + tau[:, None, None] * eps
        with torch.set_grad_enabled(config.train_text_encoders):
            cond = text(batch_captions(idx, drop))
        return F.mse_loss(flux_velocity(transformer, x, tau, g, cond, ids), eps - x0)

    modules = [transformer]
    for encoder in text.encoders():
        # eval(): no dropout (T5's default 0.1), so the build is deterministic; still trained by gradient
        encoder.eval().requires_grad_(config.train_text_encoders)
        if config.train_text_encoders:
            modules.append(encoder)
    if not config.train_text_encoders:
        text.freeze()
    transformer.train()
    use_cycle_data(1)
    losses, finished = runner.run("flow", config.flow_steps, modules, flow_loss)
    history["flow"] = losses
    if not finished:
        return None
    # warm restarts from the previous cycle's EMA (run() ends a stage with its EMA in the weights); each cycle
    # starts its own EMA, with the usual warm-up; the summary's flow loss is the last cycle's
    for cycle in range(2, config.flow_cycles + 1):
        use_cycle_data(cycle)
        losses, finished = runner.run(f"flow_cycle{cycle}", config.cycle_steps or config.flow_steps, modules,
                                      flow_loss, lr=config.cycle_lr)
        history["flow"] = losses
        if not finished:
            return None
    text.freeze()
    if config.guidance_steps:
        frozen = copy.deepcopy(transformer).eval().requires_grad_(False)

        def guidance_loss(idx):
            x0 = data["x"][idx]
            tau, eps, g = _draw(x0, config, generator)
            x = (1 - tau[:, None, None]) * x0 + tau[:, None, None] * eps
            with torch.no_grad():
                cond = text(batch_captions(idx, torch.zeros(len(idx), dtype=torch.bool)))
                uncond = text(batch_captions(idx, torch.ones(len(idx), dtype=torch.bool)))
                v_c = flux_velocity(frozen, x, tau, g, cond, ids)
                v_u = flux_velocity(frozen, x, tau, g, uncond, ids)
            return F.mse_loss(flux_velocity(transformer, x, tau, g, cond, ids), v_u + g[:, None, None] * (v_c - v_u))

        stage = "guidance" if config.flow_cycles == 1 else f"guidance_cycle{config.flow_cycles}"
        losses, finished = runner.run(stage, config.guidance_steps, [transformer], guidance_loss)
        history["guidance"] = losses
        if not finished:
            return None
    transformer.eval().requires_grad_(False)
    return {stage: float(np.mean(v[-100:])) for stage, v in history.items()}, text_accuracy


def held_build_settings(build: Path, config: ToyTeacherConfig) -> dict | None:
    """The settings a build folder (`<output_dir>/build`) was made with, in the form of `config.identity()`:
    settings that did not exist yet when it started, or that it never used, read as `config`'s. None without a
    record."""
    path = build / "config.json"
    if not path.exists():
        return None
    identity = config.identity()
    previous = json.loads(path.read_text())
    # a one-cycle build (also one made before warm restarts existed) never used the cycle settings
    previous.setdefault("flow_cycles", 1)
    if previous["flow_cycles"] == 1:
        previous.update({key: identity[key] for key in CYCLE_KEYS})
    previous.setdefault("text_pretrain_steps", 0)  # made before the text stage existed
    if previous["text_pretrain_steps"] == 0:
        previous["text_pretrain_lr"] = identity["text_pretrain_lr"]
    previous.setdefault("reading_order_from_cycle", 0)
    return previous


def _check_build_config(build: Path, config: ToyTeacherConfig) -> None:
    from common.cli import UsageError

    if config.reading_order_from_cycle > config.flow_cycles:
        raise UsageError(f"--reading_order_from_cycle {config.reading_order_from_cycle} names a cycle after the last "
                         f"(--flow_cycles {config.flow_cycles}); raise --flow_cycles or lower it")
    path = build / "config.json"
    identity = config.identity()
    previous = held_build_settings(build, config)
    if previous is not None:
        # more cycles continue a build; the guidance stage after the new last cycle starts afresh, and reading
        # order may start with a new cycle (the build's cycles so far did not use it)
        grown = previous["flow_cycles"] < config.flow_cycles
        free = ("flow_cycles", "guidance_steps") if grown else ()
        unused = previous["reading_order_from_cycle"] == 0
        if grown and unused and config.reading_order_from_cycle > previous["flow_cycles"]:
            free += ("reading_order_from_cycle",)
        changed = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v and k not in free}
        if changed:
            held = ", ".join(f"{k} {old} (asked {new})" for k, (old, new) in changed.items())
            flags = [f"--{k} {old}" for k, (old, _) in changed.items() if k in CLI_SETTINGS]
            fix = " ".join(flags) if len(flags) == len(changed) else "the --preset and flags it was made with"
            raise UsageError(f"{build} holds a build with other settings: {held}; continue it with {fix}, or use "
                             "another --output_dir")
        if grown:
            # the finished teacher in output_dir is now the previous cycle's: set its summary aside, so that
            # nothing takes the folder for a finished build until the new cycle is saved
            summary = build.parent / SUMMARY
            if summary.exists():
                os.replace(summary, build / f"{Path(SUMMARY).stem}_cycles{previous['flow_cycles']}.json")
            atomic_write_text(path, json.dumps(identity, indent=1))
    else:
        build.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=1))


def build_toy_teacher(output_dir: str | Path, config: ToyTeacherConfig | None = None, log=print,
                      snapshot=None, snapshot_every: int = 1000, stop_after: int | None = None) -> Path | None:
    """Render the world, train the VAE, the transformer and the encoders, and save the FLUX pipeline folder.

    Resumable: progress lives in `<output_dir>/build/`. `stop_after` stops (resumably) after that many
    training steps of this call, over all stages; the return value is then None.
    """
    from diffusers import AutoencoderKL, FluxPipeline

    config = config or ToyTeacherConfig()
    output_dir = Path(output_dir)
    build = output_dir / BUILD_DIR
    _check_build_config(build, config)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    components = build_components(config.dims(), config.seed)
    images, metadata = render_training_set(config)
    _log(log, f"rendered {len(images)} training images ({time.perf_counter() - start:.0f} s)")
    if (build / "latents.pt").exists():
        components["vae"] = AutoencoderKL.from_pretrained(build / "vae").eval().requires_grad_(False)
        saved = torch.load(build / "latents.pt", map_location="cpu", weights_only=True)
        latents = saved["latents"]
        generator.set_state(saved["generator"])
        _log(log, "reusing the trained VAE")
    else:
        latents = train_vae(components["vae"], images, config, generator, log)
        components["vae"].save_pretrained(build / "vae", safe_serialization=True)
        atomic_torch_save({"latents": latents, "generator": generator.get_state()}, build / "latents.pt")
    del images
    ordered = None
    if config.reading_order_from_cycle:
        ordered = reading_order_latents(components["vae"], latents, config)
        _log(log, f"reading order from cycle {config.reading_order_from_cycle}: "
                  f"{int((ordered != latents).flatten(1).any(1).sum())} images mirrored")
    trained = train_transformer(components, latents, metadata, config, generator, build, log, snapshot,
                                snapshot_every, stop_after, ordered)
    if trained is None:
        return None
    final_losses, text_accuracy = trained
    FluxPipeline(**components).save_pretrained(output_dir, safe_serialization=True)
    summary = {"config": config.identity(), "final_losses": final_losses, "seconds": time.perf_counter() - start}
    if text_accuracy is not None:
        summary["text_pretrain_accuracy"] = text_accuracy
    (output_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    _log(log, f"toy teacher saved to {output_dir} ({summary['seconds']:.0f} s of this run)")
    return output_dir


PRESETS = {
    "full": ToyTeacherConfig(),
    # the encoders pretrained on the world's captions, then frozen through every later stage (as FLUX's)
    "pretrained_text": ToyTeacherConfig(text_pretrain_steps=2000, train_text_encoders=False),
    "quick": ToyTeacherConfig(num_images=4000, vae_steps=400, flow_steps=600, guidance_steps=100),
    "smoke": ToyTeacherConfig(num_images=48, vae_steps=4, flow_steps=4, guidance_steps=2, batch=8, vae_batch=4,
                              num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                              axes_dims_rope=(4, 6, 6), text_dim=32, vae_channels=(8, 8, 16, 16)),
}


def main(argv=None) -> None:
    from common.cli import ArgumentParser, nonnegative_int, positive_float, positive_int

    parser = ArgumentParser(description="Build (or continue building) the toy teacher.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--text_pretrain_steps", type=nonnegative_int, default=None,
                        help="pretrain the text encoders on the world's captions first (0: no text stage)")
    parser.add_argument("--flow_steps", type=positive_int, default=None)
    parser.add_argument("--flow_cycles", type=positive_int, default=None,
                        help="cosine cycles of the flow stage; raising it on a finished build continues it")
    parser.add_argument("--cycle_steps", type=nonnegative_int, default=None,
                        help="steps of each cycle after the first (0, the default: --flow_steps)")
    parser.add_argument("--cycle_lr", type=positive_float, default=None,
                        help="peak learning rate of the cycles after the first")
    parser.add_argument("--reading_order_from_cycle", type=nonnegative_int, default=None,
                        help="from this flow cycle on, 'a X and a Y' images show X left of Y (0: never); a finished "
                             "build can take it with a new cycle")
    parser.add_argument("--guidance_steps", type=nonnegative_int, default=None)
    parser.add_argument("--stop_after", type=positive_int, default=None,
                        help="stop (resumably) after this many training steps of this run")
    parser.add_argument("--snapshot_every", type=positive_int, default=None,
                        help="also save the EMA pipeline every N steps under <output_dir>/build/snapshots/")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(ToyTeacherConfig)
                 if getattr(args, f.name, None) is not None}
    config = ToyTeacherConfig(**{**asdict(PRESETS[args.preset]), **overrides})
    snapshot = None
    if args.snapshot_every:
        snapshot = SnapshotWriter(Path(args.output_dir), config)
    build_toy_teacher(args.output_dir, config, snapshot=snapshot, snapshot_every=args.snapshot_every or 1000,
                      stop_after=args.stop_after,
                      log=lambda msg: print(f"[toy-teacher {time.strftime('%H:%M:%S')}] {msg}", flush=True))


class SnapshotWriter:
    """Writes each EMA snapshot as a loadable pipeline folder (the build's VAE, the snapshot's weights)."""

    def __init__(self, output_dir: Path, config: ToyTeacherConfig):
        self.output_dir, self.config = output_dir, config

    def __call__(self, stage: str, step: int, states: list[dict]) -> None:
        from diffusers import AutoencoderKL, FluxPipeline

        components = build_components(self.config.dims(), self.config.seed)
        components["vae"] = AutoencoderKL.from_pretrained(self.output_dir / BUILD_DIR / "vae")
        names = ["transformer", "text_encoder", "text_encoder_2"]
        for name, state in zip(names, states):
            components[name].load_state_dict(state)
        FluxPipeline(**components).save_pretrained(self.output_dir / BUILD_DIR / "snapshots" / f"{stage}_{step}",
                                                   safe_serialization=True)


if __name__ == "__main__":
    from common.cli import run

    run(main)
