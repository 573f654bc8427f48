import pytest
import torch
from diffusers import FluxPipeline

from model.latents import (denormalize_latents, image_ids, latent_size, normalize_latents, pack_latents,
                           unpack_latents)


def test_pack_layout_matches_the_specification():
    b, c, h, w = 2, 16, 6, 8
    x = torch.randn(b, c, h, w)
    packed = pack_latents(x)
    assert packed.shape == (b, (h // 2) * (w // 2), 4 * c)
    for i in range(h // 2):
        for j in range(w // 2):
            for dy in range(2):
                for dx in range(2):
                    token, feats = i * (w // 2) + j, torch.arange(c) * 4 + 2 * dy + dx
                    assert torch.equal(packed[:, token, feats], x[:, :, 2 * i + dy, 2 * j + dx])


def test_pack_unpack_round_trip_and_diffusers_agreement():
    x = torch.randn(3, 16, 8, 12)
    packed = pack_latents(x)
    assert torch.equal(unpack_latents(packed, 8, 12), x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 64, 96, 8))


def test_image_ids_layout_and_diffusers_agreement():
    ids = image_ids(6, 8)
    assert ids.shape == (12, 3)
    assert ids[1 * 4 + 3].tolist() == [0, 1, 3]
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))


def test_latent_size_errors_on_bad_resolution():
    assert latent_size(512, 1024) == (64, 128)
    with pytest.raises(ValueError, match="multiple of 16"):
        latent_size(500, 512)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))


def test_normalisation_round_trip():
    class Cfg:
        shift_factor, scaling_factor = 0.1159, 0.3611

    z = torch.randn(2, 16, 4, 4)
    x0 = normalize_latents(z, Cfg)
    assert torch.allclose(x0, (z - 0.1159) * 0.3611)
    assert torch.allclose(denormalize_latents(x0, Cfg), z, atol=1e-6)
