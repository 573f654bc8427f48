"""FLUX transformer variants: the time/guidance input multiplier, and MeanFlow's dual-timestep embedding.

`FluxTransformer` is diffusers' FluxTransformer2DModel with two config options and nothing else changed:

- `time_input_scale`: the multiplier applied to the flow time tau in [0, 1] and to the guidance scale before
  the sinusoidal embedding. 1000 reproduces FLUX exactly; 1 is the "rescaled" (x1) model that every
  distillation run uses, because x1000 inputs make JVP tangents in time ~1000x larger (METHODS 2.2).
- `dual_timestep`: MeanFlow's student adds MLP_2(phi(scale * (t - r))) to the conditioning vector, through a
  second time embedder `timestep_embedder2` (the reference's name, so its released students load as they are).

The conditioning vector is computed here in fp32 from the exact time inputs (diffusers casts the time to the
hidden-state dtype, bf16 in training, before multiplying by 1000) and handed to diffusers' forward, which is
otherwise used unchanged. Pipelines always pass tau in [0, 1] and the raw guidance scale, whatever the scale.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding

FLUX_TIME_SCALE = 1000.0
TIME_EMBED_DIM = 256


def sinusoidal_embedding(x: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """phi(x) = [cos(x w_k), sin(x w_k)], w_k = max_period^(-k/(dim/2)): FLUX's time_proj, in fp32 (fp64 if x is).

    diffusers' Timesteps module computes the same features but always in fp32.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=x.device) / half)
    args = x.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
DUAL_TIMESTEP_KEYS = ("timestep_embedder2.",)


class FluxTransformer(FluxTransformer2DModel):
    """FluxTransformer2DModel with a configurable time/guidance multiplier and an optional t - r embedder."""

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        time_input_scale: float = FLUX_TIME_SCALE,
        dual_timestep: bool = False,
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        self.timestep_embedder2 = (
            TimestepEmbedding(in_channels=TIME_EMBED_DIM, time_embed_dim=self.inner_dim) if dual_timestep else None
        )
        # diffusers' forward computes its conditioning vector by calling `time_text_embed`; a hook hands it
        # the one computed by `embed_conditioning` for the duration of our forward.
        self._conditioning: torch.Tensor | None = None
        self.time_text_embed.register_forward_hook(self._use_precomputed_conditioning)

    def _use_precomputed_conditioning(self, module, args, output):
        return output if self._conditioning is None else self._conditioning

    @contextmanager
    def _precomputed_conditioning(self, temb: torch.Tensor):
        self._conditioning = temb
        try:
            yield
        finally:
            self._conditioning = None

    def _embed_scalar(self, embedder: torch.nn.Module, value: torch.Tensor, batch: int, dtype) -> torch.Tensor:
        value = torch.as_tensor(value, device=self.device).reshape(-1)
        value = value.expand(batch) if value.numel() == 1 else value
        return embedder(sinusoidal_embedding(value * self.config.time_input_scale).to(dtype))

    def embed_conditioning(
        self,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        timestep2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """temb = MLP_t(phi(s tau)) + MLP_g(phi(s g)) + MLP_txt(pooled) [+ MLP_2(phi(s (t - r)))], s = time scale.

        Time inputs may be [B], [B, 1, ...] or scalars; phi is evaluated in fp32.
        """
        emb = self.time_text_embed
        batch, dtype = pooled_projections.shape[0], pooled_projections.dtype
        temb = self._embed_scalar(emb.timestep_embedder, timestep, batch, dtype)
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX transformer is guidance-distilled: pass `guidance` (e.g. 3.5)")
            temb = temb + self._embed_scalar(emb.guidance_embedder, guidance, batch, dtype)
        if self.timestep_embedder2 is not None:
            if timestep2 is None:
                raise ValueError("this dual-timestep (MeanFlow) transformer needs `timestep2` = t - r")
            temb = temb + self._embed_scalar(self.timestep_embedder2, timestep2, batch, dtype)
        elif timestep2 is not None:
            raise ValueError("`timestep2` was passed to a transformer without a second time embedder")
        return temb + emb.text_embedder(pooled_projections)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.Tensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        timestep2: torch.Tensor | None = None,
        **kwargs,
    ):
        """diffusers' FLUX forward; `timestep` is tau in [0, 1], `timestep2` is t - r (dual-timestep only)."""
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        guidance = None if guidance is None else torch.as_tensor(guidance, device=hidden_states.device)
        temb = self.embed_conditioning(timestep, guidance, pooled_projections, timestep2)
        if img_ids is not None and img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids is not None and txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        with self._precomputed_conditioning(temb):
            return super().forward(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep.reshape(-1),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=None if guidance is None else guidance.reshape(-1),
                **kwargs,
            )

    @torch.no_grad()
    def add_dual_timestep_embedder(self, zero_init_last: bool = False) -> None:
        """Give the model MeanFlow's second time embedder, as a real copy of the first (no shared storage).

        With `zero_init_last` its output layer starts at zero, so the student equals the teacher at init
        (the reference copies without zeroing, so its student differs from the teacher from the start).
        """
        source = self.time_text_embed.timestep_embedder
        if self.timestep_embedder2 is None:
            self.timestep_embedder2 = TimestepEmbedding(in_channels=TIME_EMBED_DIM, time_embed_dim=self.inner_dim)
            self.register_to_config(dual_timestep=True)
        self.timestep_embedder2.load_state_dict({k: v.detach().clone() for k, v in source.state_dict().items()})
        self.timestep_embedder2.to(device=source.linear_1.weight.device, dtype=source.linear_1.weight.dtype)
        if zero_init_last:
            self.timestep_embedder2.linear_2.weight.zero_()
            self.timestep_embedder2.linear_2.bias.zero_()


def flux_velocity(model, z, t, g, cond, img_ids, timestep2=None) -> torch.Tensor:
    """The transformer's output at packed z [B, L, C], flow time t [B], guidance g [B] and text `cond`
    (a model.text.PromptEmbeds), returned in at least fp32.

    Inputs are cast to the model's dtype inside (differentiably, so fp32 JVP tangents work with bf16 weights).
    """
    dtype = next(model.parameters()).dtype
    cond = cond.to(dtype=dtype)
    extra = {} if timestep2 is None else {"timestep2": timestep2}
    out = model(hidden_states=z.to(dtype), encoder_hidden_states=cond.prompt_embeds,
                pooled_projections=cond.pooled_prompt_embeds, timestep=t, guidance=g, img_ids=img_ids,
                txt_ids=cond.text_ids, return_dict=False, **extra)[0]
    return out.to(torch.promote_types(out.dtype, torch.float32))
