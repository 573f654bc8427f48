"""The exact world's networks, with the FLUX transformer's call signature so the real loss code runs unchanged.

- `ExactTeacher`: the closed-form (guided) velocity of `GaussianMixtureWorld`, as a frozen module. Its only
  parameter holds the mode means (so `next(model.parameters()).dtype` picks the compute dtype, as for FLUX).
- `ExactWorldNet`: the student, a residual MLP over the flattened packed latent with adaptive-LayerNorm
  conditioning on temb = MLP_t(phi(s t)) + MLP_g(phi(s g)) + Linear(pooled) [+ MLP_2(phi(s (t - r)))], phi being
  FLUX's sinusoidal embedding and s the time-input scale (1, as every distilled FLUX student). It has what the
  losses and samplers use of a FluxTransformer: `forward(hidden_states, encoder_hidden_states,
  pooled_projections, timestep, img_ids, txt_ids, guidance, timestep2, return_dict)`, `embed_conditioning`
  (sCM's log-variance head), `inner_dim`, `config.in_channels` / `config.time_input_scale`, MeanFlow's
  `add_dual_timestep_embedder`, and diffusers' `save_pretrained` / `from_pretrained` (exports, checkpoints).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin

from model.transformer import TIME_EMBED_DIM, sinusoidal_embedding

from .world import GaussianMixtureWorld


class ExactTeacher(torch.nn.Module):
    """v_g(x, t, c) of the world in closed form; `guidance` is the CFG scale (None or absent: 1)."""

    def __init__(self, world: GaussianMixtureWorld, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.world = world
        self.means = torch.nn.Parameter(world.means.to(dtype), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, return_dict=True, **unused):
        ids = self.world.ids_from_embeds(pooled_projections)
        v = self.world.velocity(hidden_states.to(self.means.dtype), timestep, ids, guidance)
        return (v,) if not return_dict else {"sample": v}


class _Block(torch.nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), modulated by temb (adaLN, as DiT / FLUX blocks)."""

    def __init__(self, width: int, mlp_ratio: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = torch.nn.Linear(width, 3 * width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, mlp_ratio * width), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(mlp_ratio * width, width))

    def forward(self, x, temb):
        shift, scale, gate = self.modulation(torch.nn.functional.silu(temb)).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class ExactWorldNet(ModelMixin, ConfigMixin):
    """A FLUX-signature velocity network for the exact world (see the module docstring)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, num_tokens: int = 4, in_channels: int = 4, text_dim: int = 9, width: int = 256,
                 depth: int = 4, mlp_ratio: int = 2, time_input_scale: float = 1.0, guidance_embeds: bool = True,
                 dual_timestep: bool = False):
        super().__init__()
        self.inner_dim = width
        dim = num_tokens * in_channels
        self.x_embedder = torch.nn.Linear(dim, width)
        self.timestep_embedder = TimestepEmbedding(TIME_EMBED_DIM, width)
        self.guidance_embedder = TimestepEmbedding(TIME_EMBED_DIM, width) if guidance_embeds else None
        self.text_embedder = torch.nn.Linear(text_dim, width)
        self.timestep_embedder2 = TimestepEmbedding(TIME_EMBED_DIM, width) if dual_timestep else None
        self.blocks = torch.nn.ModuleList(_Block(width, mlp_ratio) for _ in range(depth))
        self.norm_out = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = torch.nn.Linear(width, 2 * width)
        self.proj_out = torch.nn.Linear(width, dim)

    def _embed(self, embedder, value, batch, dtype):
        value = torch.as_tensor(value, device=self.device).reshape(-1)
        value = value.expand(batch) if value.numel() == 1 else value
        return embedder(sinusoidal_embedding(value * self.config.time_input_scale).to(dtype))

    def embed_conditioning(self, timestep, guidance, pooled_projections, timestep2=None) -> torch.Tensor:
        """temb = MLP_t(phi(s t)) + MLP_g(phi(s g)) + Linear(pooled) [+ MLP_2(phi(s (t - r)))] (FLUX's layout)."""
        batch, dtype = pooled_projections.shape[0], pooled_projections.dtype
        temb = self._embed(self.timestep_embedder, timestep, batch, dtype)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this network has a guidance embedding: pass `guidance`")
            temb = temb + self._embed(self.guidance_embedder, guidance, batch, dtype)
        if self.timestep_embedder2 is not None:
            if timestep2 is None:
                raise ValueError("this dual-timestep (MeanFlow) network needs `timestep2` = t - r")
            temb = temb + self._embed(self.timestep_embedder2, timestep2, batch, dtype)
        elif timestep2 is not None:
            raise ValueError("`timestep2` was passed to a network without a second time embedder")
        return temb + self.text_embedder(pooled_projections)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, timestep2=None, return_dict=True, **unused):
        """Velocity [B, L, C] at packed hidden_states [B, L, C]; timestep is the flow time in [0, 1]."""
        shape = hidden_states.shape
        temb = self.embed_conditioning(timestep, guidance, pooled_projections.to(hidden_states.dtype), timestep2)
        x = self.x_embedder(hidden_states.reshape(shape[0], -1))
        for block in self.blocks:
            x = block(x, temb)
        shift, scale = self.out_modulation(torch.nn.functional.silu(temb)).chunk(2, dim=-1)
        out = self.proj_out(self.norm_out(x) * (1 + scale) + shift).reshape(shape)
        return (out,) if not return_dict else {"sample": out}

    @torch.no_grad()
    def add_dual_timestep_embedder(self, zero_init_last: bool = False) -> None:
        """MeanFlow's second time embedder as a real copy of the first (its output layer zeroed with
        `zero_init_last`, so the student starts equal to the velocity model), as `FluxTransformer` does."""
        source = self.timestep_embedder
        if self.timestep_embedder2 is None:
            self.timestep_embedder2 = TimestepEmbedding(TIME_EMBED_DIM, self.inner_dim)
            self.register_to_config(dual_timestep=True)
        self.timestep_embedder2.load_state_dict({k: v.detach().clone() for k, v in source.state_dict().items()})
        self.timestep_embedder2.to(device=source.linear_1.weight.device, dtype=source.linear_1.weight.dtype)
        if zero_init_last:
            self.timestep_embedder2.linear_2.weight.zero_()
            self.timestep_embedder2.linear_2.bias.zero_()
