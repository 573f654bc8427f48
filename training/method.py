"""What a distillation method declares to the training skeleton: its networks, the phases of one iteration, its data.

A single-network method (sCM, MeanFlow, rescaling) defines `build` (student, teacher) and `loss`; the defaults turn
them into one trained network "student" with the common optimiser flags and one phase. A method that trains
several networks (SiD: the generator and the fake score) overrides `build_networks` and `phases`: each network has
its own optimiser, LR schedule, clipping and optional EMA, and each phase updates one network on its own batch, in
order (SiD: the fake-score update, then the generator update).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

import torch

from model.text import PromptEmbeds, encode_prompts


@dataclass
class Batch:
    """One encoded batch: packed normalised latents [B, L, 64] (fp32; None for prompt-only data), text
    conditioning, image ids and the latent size."""

    x0: torch.Tensor | None
    cond: PromptEmbeds
    img_ids: torch.Tensor
    captions: list[str]
    latent_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class Components:
    """The frozen parts of the FLUX pipeline: tokenizers, text encoders, VAE and scheduler."""

    tokenizer: object
    text_encoder: torch.nn.Module
    tokenizer_2: object
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object

    def encode(self, prompts: list[str], max_sequence_length: int, device) -> PromptEmbeds:
        return encode_prompts(prompts, self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                              max_sequence_length, device)

    def pipeline(self, cls, transformer):
        return cls(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                   text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, transformer=transformer)


@dataclass
class NetworkSpec:
    """A network the method trains and its optimisation settings; None means the common flag's value."""

    module: torch.nn.Module
    learning_rate: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    epsilon: float | None = None
    max_grad_norm: float | None = None
    ema_decay: float | None = None
    grad_hooks: list[Callable] = field(default_factory=list)  # applied to every parameter gradient, in order


@dataclass
class Phase:
    """One update of an iteration: `loss(nets, teacher, batch, step, generator) -> (loss, logs)` trains `network`.

    `nets.plain(name)` is a network's module, `nets.wrapped(name)` its DDP/DeepSpeed-wrapped module (use it for the
    forward whose gradients are trained). `active(step)` may skip the phase at some steps (e.g. a warm-up); the
    trained networks in `frozen` have requires_grad off from the loss's forward to the end of its backward.
    """

    network: str
    loss: Callable
    active: Callable[[int], bool] | None = None
    frozen: tuple[str, ...] = ()  # other trained networks used by the loss, frozen through its forward and backward
    images: bool = True  # False: the loss never reads batch.x0, so the batch's images are not VAE-encoded


class DistillationMethod:
    """What a method defines. The skeleton calls these; everything else is shared."""

    name = "method"
    tracker_project = "flux_distill"
    pipeline_cls = None  # a model.pipeline class used for validation images
    export_network = "student"  # the network exported for inference
    needs_images = True  # False: the data are prompts only (no image is decoded)
    needs_rescaled = False  # True: the networks are x1 models from --rescaled_checkpoint_path (checked up front)

    def __init__(self, args: argparse.Namespace):
        self.args = args

    # ----- single-network methods define these two -----
    def build(self, components: Components, dtype: torch.dtype, device) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(student: trainable module the engine wraps, teacher: frozen module or None)."""
        raise NotImplementedError

    def loss(self, student, teacher, batch: Batch, step: int, generator: torch.Generator, forward=None):
        """(scalar loss, {name: scalar tensor}) for one batch.

        `student` is the plain module (for no-grad passes such as JVPs); `forward` is the engine-wrapped
        (DDP/DeepSpeed) module, to be used for the forward whose gradients are trained.
        """
        raise NotImplementedError

    # ----- the general interface (defaults: one network "student", one phase) -----
    def build_networks(self, components: Components, dtype: torch.dtype, device):
        """({name: NetworkSpec} of the trained networks, in update order; the frozen teacher or None)."""
        student, teacher = self.build(components, dtype, device)
        return {"student": NetworkSpec(student, ema_decay=self.args.ema_decay)}, teacher

    def phases(self) -> list[Phase]:
        def student_loss(nets, teacher, batch, step, generator):
            return self.loss(nets.plain("student"), teacher, batch, step, generator, forward=nets.wrapped("student"))

        return [Phase("student", student_loss)]

    def export_transformer(self, network: torch.nn.Module):
        """The FluxTransformer to export for inference from the (unwrapped) export network."""
        return network

    def export_metadata(self) -> dict | None:
        """Sampling settings saved beside every export (e.g. SiD's generator schedule); None for none."""
        return None

    def rank_state(self) -> dict:
        """Per-rank state to checkpoint besides the random stream (plain tensors, numbers, lists)."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        pass
