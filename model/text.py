"""Prompt encoding for FLUX (METHODS 1.5): CLIP pooled output + T5 sequence, as FluxPipeline computes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .latents import text_ids


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: T5 sequence [B, L, D_t5], CLIP pooled [B, D_clip], text ids [L, 3]."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def repeat_interleave(self, n: int) -> "PromptEmbeds":
        return PromptEmbeds(
            self.prompt_embeds.repeat_interleave(n, dim=0),
            self.pooled_prompt_embeds.repeat_interleave(n, dim=0),
            self.text_ids,
        )

    def index(self, idx) -> "PromptEmbeds":
        return PromptEmbeds(self.prompt_embeds[idx], self.pooled_prompt_embeds[idx], self.text_ids)

    def where(self, mask: torch.Tensor, other: "PromptEmbeds") -> "PromptEmbeds":
        """Per sample: `other` where mask is True (e.g. the empty prompt for label dropout), else self."""
        m = mask.to(self.prompt_embeds.device)
        return PromptEmbeds(
            torch.where(m[:, None, None], other.prompt_embeds.expand_as(self.prompt_embeds), self.prompt_embeds),
            torch.where(m[:, None], other.pooled_prompt_embeds.expand_as(self.pooled_prompt_embeds),
                        self.pooled_prompt_embeds),
            self.text_ids,
        )

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        return PromptEmbeds(
            self.prompt_embeds.to(device=device, dtype=dtype),
            self.pooled_prompt_embeds.to(device=device, dtype=dtype),
            self.text_ids.to(device=device),
        )

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(
            torch.cat([e.prompt_embeds for e in items]),
            torch.cat([e.pooled_prompt_embeds for e in items]),
            items[0].text_ids,
        )


@torch.no_grad()
def encode_prompts(
    prompts: list[str],
    tokenizer,
    text_encoder,
    tokenizer_2,
    text_encoder_2,
    max_sequence_length: int = 256,
    device: torch.device | str | None = None,
) -> PromptEmbeds:
    """CLIP `pooler_output` at 77 tokens and T5 `last_hidden_state` at `max_sequence_length` tokens.

    Both pad to their full length and pass no attention mask, like FluxPipeline and the reference.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    device = device or text_encoder.device
    clip_ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = text_encoder(clip_ids.to(text_encoder.device), output_hidden_states=False).pooler_output
    t5_ids = tokenizer_2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    sequence = text_encoder_2(t5_ids.to(text_encoder_2.device), output_hidden_states=False)[0]
    return PromptEmbeds(
        prompt_embeds=sequence.to(device),
        pooled_prompt_embeds=pooled.to(device),
        text_ids=text_ids(max_sequence_length, device=device, dtype=sequence.dtype),
    )
