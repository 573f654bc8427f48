"""Attention for students: fused SDPA normally, and a forward-mode-AD-capable path during JVPs.

Fused SDPA kernels have no forward-AD rule (`torch.func.jvp` raises NotImplementedError through them). The
processor below keeps diffusers' FluxAttnProcessor and only switches its attention backend to diffusers'
`_native_math` (softmax(QK^T/sqrt(d))V decomposed into differentiable ops) for calls whose inputs carry
forward-mode tangents. The separate forward with grad, and everything the teacher runs, stay fused.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor


def carries_tangent(x: torch.Tensor | None) -> bool:
    """True inside torch.func.jvp / forward_ad for tensors that depend on the differentiated inputs."""
    return x is not None and fwAD.unpack_dual(x).tangent is not None


class JVPFluxAttnProcessor(FluxAttnProcessor):
    """FluxAttnProcessor that runs math attention when forward-mode tangents flow through it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        fused_backend = self._attention_backend
        if carries_tangent(hidden_states) or carries_tangent(encoder_hidden_states):
            self._attention_backend = AttentionBackendName._NATIVE_MATH
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            self._attention_backend = fused_backend


def use_jvp_attention(transformer: torch.nn.Module) -> torch.nn.Module:
    """Give every attention layer of a FLUX transformer the JVP-capable processor (returns the model)."""
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(JVPFluxAttnProcessor())
    return transformer
