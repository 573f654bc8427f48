"""Attention for students: fused SDPA normally, and an attention with its own forward-mode rule during JVPs.

Fused SDPA kernels have no forward-AD rule (`torch.func.jvp` raises NotImplementedError through them), and
the math fallback materialises every score matrix several times over. The processor below keeps diffusers'
FluxAttnProcessor unchanged and, only for calls whose inputs carry forward-mode tangents, routes
`F.scaled_dot_product_attention` (through a TorchFunctionMode) to `AttentionJVP`: the primal output comes from
the fused kernel, and the tangent from the closed form

    O = P V,  P = softmax(S),  S = scale Q K^T,  dS = scale (dQ K^T + Q dK^T),  A = P * dS,
    dO = P dV + A V - rowsum(A) O,

computed in chunks of queries so that only a chunk x keys block of scores exists at a time. The separate
forward with grad, and everything the teacher runs, stay on the fused path.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from torch.overrides import TorchFunctionMode

# bytes of one chunk's score block; small blocks stay in CPU caches, larger ones keep GPUs busy
SCORE_BLOCK_BYTES = {"cpu": 16 * 2**20, "cuda": 512 * 2**20}


def carries_tangent(x: torch.Tensor | None) -> bool:
    """True inside torch.func.jvp / forward_ad for tensors that depend on the differentiated inputs."""
    return x is not None and fwAD.unpack_dual(x).tangent is not None


def _query_chunk(q: torch.Tensor, k: torch.Tensor) -> int:
    budget = SCORE_BLOCK_BYTES.get(q.device.type, SCORE_BLOCK_BYTES["cuda"])
    per_row = k.shape[-2] * q[..., :1, :1].numel() * 4  # one query row of fp32 scores over every batch and head
    return max(16, min(q.shape[-2], budget // per_row))


def attention_tangent(q, k, v, out, dq, dk, dv, scale: float) -> torch.Tensor:
    """dO of O = softmax(scale Q K^T) V along (dQ, dK, dV) (None = zero), in query chunks; [B, H, L, D] layout."""
    kt = k.transpose(-1, -2)
    dkt = None if dk is None else dk.transpose(-1, -2)
    chunks = []
    step = _query_chunk(q, k)
    for i in range(0, q.shape[-2], step):
        qs = q[..., i:i + step, :] * scale
        scores = qs @ kt
        low_precision = scores.dtype in (torch.float16, torch.bfloat16)
        p = torch.softmax(scores.float() if low_precision else scores, dim=-1).to(q.dtype)
        ds = None
        if dq is not None:
            ds = (dq[..., i:i + step, :] * scale) @ kt
        if dkt is not None:
            ds = qs @ dkt if ds is None else ds.add_(qs @ dkt)
        chunk = p @ dv if dv is not None else torch.zeros_like(out[..., i:i + step, :])
        if ds is not None:
            a = ds.mul_(p)
            chunk.add_(a @ v).sub_(a.sum(-1, keepdim=True) * out[..., i:i + step, :])
        chunks.append(chunk)
    return torch.cat(chunks, dim=-2)


class AttentionJVP(torch.autograd.Function):
    """softmax(scale Q K^T) V: fused kernel forward, chunked closed-form forward-mode (JVP) rule."""

    @staticmethod
    def forward(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        ctx.save_for_forward(q, k, v, output)
        ctx.scale = scale

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dscale):
        q, k, v, out = ctx.saved_tensors
        return attention_tangent(q, k, v, out, dq, dk, dv, ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("AttentionJVP is forward-mode only: run JVPs under torch.no_grad(), then a separate "
                           "forward with grad (as the distillation losses do)")


class _RouteAttentionToJVP(TorchFunctionMode):
    """Sends plain (no mask, no dropout, non-causal) SDPA calls to AttentionJVP for the duration of a block."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names, args)), **kwargs}
        plain = call.get("attn_mask") is None and not call.get("dropout_p") and not call.get("is_causal") \
            and not call.get("enable_gqa")
        if not plain:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                return func(*args, **kwargs)
        q = call["query"]
        scale = call.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        return AttentionJVP.apply(q, call["key"], call["value"], scale)


class JVPFluxAttnProcessor(FluxAttnProcessor):
    """FluxAttnProcessor whose attention has a forward-mode rule when tangents flow through it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not (carries_tangent(hidden_states) or carries_tangent(encoder_hidden_states)):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        backend = self._attention_backend
        self._attention_backend = AttentionBackendName.NATIVE  # torch SDPA, which the mode can route
        try:
            with _RouteAttentionToJVP():
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            self._attention_backend = backend


def use_jvp_attention(transformer: torch.nn.Module) -> torch.nn.Module:
    """Give every attention layer of a FLUX transformer the JVP-capable processor (returns the model)."""
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(JVPFluxAttnProcessor())
    return transformer
