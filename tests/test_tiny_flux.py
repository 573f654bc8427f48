import filecmp

import torch
from diffusers import FluxPipeline

from model.tiny_flux import SIZES, build_tiny_flux


def test_tiny_flux_is_deterministic_per_seed_and_loads_in_flux_pipeline(tiny_flux, tmp_path):
    again = build_tiny_flux(tmp_path / "again", seed=0)
    other = build_tiny_flux(tmp_path / "other", seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    files = [weights, "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
             "text_encoder_2/model.safetensors", "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json",
             "scheduler/scheduler_config.json", "model_index.json"]
    for name in files:
        assert filecmp.cmp(tiny_flux / name, again / name, shallow=False), name
    assert not filecmp.cmp(tiny_flux / weights, other / weights, shallow=False)

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.vae.config.latent_channels == 16
    assert pipe.transformer.config.guidance_embeds
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of two red circles", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), max_sequence_length=32).images[0]
    assert image.size == (64, 64)


def test_tokenizers_know_geneval_words(tiny_flux):
    from transformers import CLIPTokenizer, T5Tokenizer

    clip = CLIPTokenizer.from_pretrained(tiny_flux / "tokenizer")
    t5 = T5Tokenizer.from_pretrained(tiny_flux / "tokenizer_2")
    # known words are single tokens: "a photo of two red circles" -> 6 words (+ specials)
    assert len(clip("a photo of two red circles").input_ids) == 6 + 2
    assert len(t5("a photo of two red circles").input_ids) == 6 + 1
    assert t5.unk_token_id not in t5("A Zebra, 42!").input_ids


def test_small_size_has_millions_of_parameters_and_1024_tokens_at_512px():
    dims = SIZES["small"]
    inner = dims.num_attention_heads * dims.attention_head_dim
    assert sum(dims.axes_dims_rope) == dims.attention_head_dim
    # a double block holds ~36 D^2 and a single block ~15 D^2 parameters
    approx = 36 * inner**2 * dims.num_layers + 15 * inner**2 * dims.num_single_layers
    assert 2e6 < approx < 2e7
    assert (512 // 8 // 2) ** 2 == 1024  # x8 VAE, 2x2 packing
