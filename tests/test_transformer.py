"""The x1 / x1000 variants, the dual-timestep embedder, and forward-mode AD through the whole transformer."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from model.attention import JVPFluxAttnProcessor, use_jvp_attention
from model.latents import image_ids, pack_latents, text_ids
from model.loading import load_transformer
from model.transformer import FluxTransformer


def inputs(batch=2, seed=0, dtype=torch.float32, text_len=7, dim=32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=pack_latents(torch.randn(batch, 16, 4, 4, generator=g)).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, dim, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, dim, generator=g).to(dtype),
        img_ids=image_ids(4, 4, dtype=dtype),
        txt_ids=text_ids(text_len, dtype=dtype),
    )


@torch.no_grad()
def test_x1000_variant_equals_diffusers_flux(tiny_flux):
    stock = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    ours = load_transformer(str(tiny_flux))
    kw, t, g = inputs(), torch.tensor([0.3, 0.9]), torch.tensor([3.5, 5.0])
    assert torch.equal(ours(timestep=t, guidance=g, **kw).sample, stock(timestep=t, guidance=g, **kw).sample)


@torch.no_grad()
def test_x1_variant_fed_1000t_equals_original_fed_t(tiny_flux):
    stock = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    x1 = load_transformer(str(tiny_flux), time_input_scale=1.0)
    assert x1.config.time_input_scale == 1.0
    kw, t, g = inputs(seed=1), torch.tensor([0.2, 0.7]), torch.tensor([4.0, 4.5])
    reference = stock(timestep=t, guidance=g, **kw).sample
    assert torch.equal(x1(timestep=1000 * t, guidance=1000 * g, **kw).sample, reference)
    # and it is a different function of t: fed t itself it does not match
    assert (x1(timestep=t, guidance=g, **kw).sample - reference).abs().max() > 1e-3


def test_time_embedding_is_fp32_under_bf16_weights(tiny_flux):
    """The sinusoidal features see the exact fp32 time, not a bf16-rounded one."""
    model = load_transformer(str(tiny_flux), dtype=torch.bfloat16)
    seen = []
    hook = model.time_text_embed.timestep_embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    t = torch.tensor([0.123456, 0.654321])
    proj = model.time_text_embed.time_proj(t.float() * 1000)
    with torch.no_grad():
        model(timestep=t, guidance=torch.tensor([3.5, 3.5]), **inputs(dtype=torch.bfloat16))
    hook.remove()
    assert torch.equal(seen[0], proj.to(torch.bfloat16))


@torch.no_grad()
def test_dual_timestep_zero_init_equals_single_timestep(tiny_flux):
    base = load_transformer(str(tiny_flux), time_input_scale=1.0)
    dual = load_transformer(str(tiny_flux), time_input_scale=1.0, dual_timestep=True, zero_init_dual=True)
    kw, t, g = inputs(seed=2), torch.tensor([0.4, 0.8]), torch.tensor([3.5, 4.0])
    expected = base(timestep=t, guidance=g, **kw).sample
    assert torch.equal(dual(timestep=t, guidance=g, timestep2=torch.tensor([0.1, 0.5]), **kw).sample, expected)


def test_dual_timestep_copy_is_a_real_copy(tiny_flux):
    dual = load_transformer(str(tiny_flux), time_input_scale=1.0, dual_timestep=True)
    first, second = dual.time_text_embed.timestep_embedder, dual.timestep_embedder2
    assert torch.equal(first.linear_1.weight, second.linear_1.weight)
    assert first.linear_1.weight.data_ptr() != second.linear_1.weight.data_ptr()
    with torch.no_grad():
        second.linear_1.weight.add_(1.0)
    assert not torch.equal(first.linear_1.weight, second.linear_1.weight)
    assert dual.config.dual_timestep is True


def test_timestep2_is_required_exactly_for_dual_models(tiny_flux):
    dual = load_transformer(str(tiny_flux), time_input_scale=1.0, dual_timestep=True)
    single = load_transformer(str(tiny_flux), time_input_scale=1.0)
    kw, t, g = inputs(), torch.tensor([0.4, 0.8]), torch.tensor([3.5, 4.0])
    with pytest.raises(ValueError, match="timestep2"):
        dual(timestep=t, guidance=g, **kw)
    with pytest.raises(ValueError, match="timestep2"):
        single(timestep=t, guidance=g, timestep2=t, **kw)
    with pytest.raises(ValueError, match="guidance"):
        single(timestep=t, **kw)


def test_save_and_reload_keeps_the_variant(tiny_flux, tmp_path):
    dual = load_transformer(str(tiny_flux), time_input_scale=1.0, dual_timestep=True)
    dual.save_pretrained(tmp_path / "student")
    again = FluxTransformer.from_pretrained(tmp_path / "student")
    assert again.config.time_input_scale == 1.0 and again.timestep_embedder2 is not None
    for (k, a), (k2, b) in zip(dual.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def _jvp_function(model, kw, g):
    def f(x, t):
        return model(hidden_states=x, timestep=t, guidance=g, return_dict=False, **kw)[0]

    return f


@pytest.mark.parametrize("dual", [False, True])
def test_jvp_through_the_transformer_matches_central_differences(tiny_flux, dual):
    """torch.func.jvp along (dx, dt) equals (f(x + h dx, t + h dt) - f(x - h dx, t - h dt)) / 2h in fp64.

    diffusers applies RoPE in fp32 even in an fp64 model, so h is large enough (3e-3) for that rounding
    (~1e-7 relative) to stay below the tolerance; the O(h^2) truncation error is smaller still.
    """
    model = load_transformer(str(tiny_flux), time_input_scale=1.0, dual_timestep=dual).double()
    use_jvp_attention(model)
    kw = inputs(seed=3, dtype=torch.float64)
    x = kw.pop("hidden_states")
    if dual:
        kw["timestep2"] = torch.tensor([0.2, 0.05], dtype=torch.float64)
    g = torch.tensor([4.0, 5.0], dtype=torch.float64)
    f = _jvp_function(model, kw, g)
    t = torch.tensor([0.3, 0.75], dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    dx, dt = torch.randn(x.shape, generator=gen, dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    h = 3e-3
    with torch.no_grad():
        for tangents in [(dx, dt), (torch.zeros_like(x), dt)]:  # joint, and the time direction alone
            out, tangent = torch.func.jvp(f, (x, t), tangents)
            fd = (f(x + h * tangents[0], t + h * tangents[1]) - f(x - h * tangents[0], t - h * tangents[1])) / (2 * h)
            assert torch.allclose(out, f(x, t), atol=1e-12)
            assert fd.norm() > 1e-2  # the check is not vacuous
            error = (tangent - fd).norm() / fd.norm()
            assert error < 1e-4, error


def test_jvp_attention_primal_equals_fused_and_grads_flow(tiny_flux):
    fused = load_transformer(str(tiny_flux), time_input_scale=1.0)
    jvp_model = use_jvp_attention(load_transformer(str(tiny_flux), time_input_scale=1.0))
    assert all(isinstance(p, JVPFluxAttnProcessor) for p in jvp_model.attn_processors.values())
    kw, t, g = inputs(seed=5), torch.tensor([0.3, 0.6]), torch.tensor([4.0, 4.0])
    x = kw.pop("hidden_states")
    with torch.no_grad():
        a = fused(hidden_states=x, timestep=t, guidance=g, **kw).sample
        b = jvp_model(hidden_states=x, timestep=t, guidance=g, **kw).sample
    assert torch.allclose(a, b, atol=1e-5)
    # a JVP in fp32 works and agrees with the fp64 one to fp32 accuracy
    f32 = _jvp_function(jvp_model, kw, g)
    with torch.no_grad():
        _, tan32 = torch.func.jvp(f32, (x, t), (torch.ones_like(x), torch.ones_like(t)))
    model64 = use_jvp_attention(load_transformer(str(tiny_flux), time_input_scale=1.0).double())
    kw64 = {k: v.double() for k, v in kw.items()}
    f64 = _jvp_function(model64, kw64, g.double())
    with torch.no_grad():
        _, tan64 = torch.func.jvp(f64, (x.double(), t.double()), (torch.ones_like(x).double(), torch.ones_like(t).double()))
    assert torch.allclose(tan32.double(), tan64, rtol=1e-3, atol=1e-5)


def test_checkpointed_forward_gives_the_same_gradients_after_a_jvp(tiny_flux):
    """The training pattern: JVP under no_grad, then a separate checkpointed forward with grad."""
    torch.manual_seed(0)
    plain = use_jvp_attention(load_transformer(str(tiny_flux), time_input_scale=1.0))
    ckpt = use_jvp_attention(load_transformer(str(tiny_flux), time_input_scale=1.0))
    ckpt.enable_gradient_checkpointing()
    kw, t, g = inputs(seed=6), torch.tensor([0.3, 0.6]), torch.tensor([4.0, 4.0])
    x = kw.pop("hidden_states")
    with torch.no_grad():
        torch.func.jvp(_jvp_function(ckpt, kw, g), (x, t), (torch.ones_like(x), torch.zeros_like(t)))
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(hidden_states=x, timestep=t, guidance=g, **kw).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_sinusoidal_embedding_equals_diffusers_time_proj():
    from diffusers.models.embeddings import Timesteps

    from model.transformer import sinusoidal_embedding

    x = torch.tensor([0.0, 0.37, 1.0, 250.0, 999.0])
    assert torch.equal(sinusoidal_embedding(x), Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(x))
    assert sinusoidal_embedding(x.double()).dtype == torch.float64


def _plain_attention(q, k, v):
    return torch.softmax((q / q.shape[-1] ** 0.5) @ k.transpose(-1, -2), dim=-1) @ v


@pytest.mark.parametrize("block_bytes", [None, 2048])  # one chunk, or many small query chunks
def test_attention_jvp_rule_equals_autodiff_of_plain_attention(monkeypatch, block_bytes):
    import model.attention as A

    if block_bytes:
        monkeypatch.setitem(A.SCORE_BLOCK_BYTES, "cpu", block_bytes)
    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64) for _ in range(6))
    with torch.no_grad():
        out, expected = torch.func.jvp(_plain_attention, (q, k, v), (dq, dk, dv))
        out2, got = torch.func.jvp(lambda a, b, c: A.AttentionJVP.apply(a, b, c, 8 ** -0.5), (q, k, v), (dq, dk, dv))
        assert torch.allclose(out2, out, atol=1e-12) and torch.allclose(got, expected, atol=1e-10)
        # tangents for only some inputs (the others are None inside the rule)
        _, expected_q = torch.func.jvp(lambda a: _plain_attention(a, k, v), (q,), (dq,))
        _, got_q = torch.func.jvp(lambda a: A.AttentionJVP.apply(a, k, v, 8 ** -0.5), (q,), (dq,))
        assert torch.allclose(got_q, expected_q, atol=1e-10)
    if block_bytes:
        assert A._query_chunk(q, k) < q.shape[-2]  # the chunked path really ran


def test_jvp_processor_routes_attention_only_while_tangents_flow(tiny_flux, monkeypatch):
    import model.attention as A

    calls = []
    original = A.attention_tangent
    monkeypatch.setattr(A, "attention_tangent", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = use_jvp_attention(load_transformer(str(tiny_flux), time_input_scale=1.0))
    kw, t, g = inputs(seed=7), torch.tensor([0.3, 0.6]), torch.tensor([4.0, 4.0])
    x = kw.pop("hidden_states")
    f = _jvp_function(model, kw, g)
    with torch.no_grad():
        f(x, t)
        assert calls == []
        torch.func.jvp(f, (x, t), (torch.ones_like(x), torch.zeros_like(t)))
    assert len(calls) == model.config.num_layers + model.config.num_single_layers
