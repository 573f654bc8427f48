"""Latent layout (2x2 packing, position ids) and VAE latent normalisation (METHODS 1.3-1.4)."""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: token i*(w/2)+j holds pixel (2i+dy, 2j+dx) at feature c*4+2dy+dx."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Exact inverse of pack_latents; `height` and `width` are the latent (not pixel) sizes h and w."""
    b, tokens, features = packed.shape
    if tokens != (height // 2) * (width // 2) or features % 4:
        raise ValueError(f"cannot unpack {tuple(packed.shape)} into a {height}x{width} latent")
    x = packed.view(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[(h/2)(w/2), 3] rotary position ids of the packed image tokens: row (0, i, j) for token (i, j)."""
    i = torch.arange(height // 2, device=device).view(-1, 1).expand(-1, width // 2)
    j = torch.arange(width // 2, device=device).view(1, -1).expand(height // 2, -1)
    ids = torch.stack([torch.zeros_like(i), i, j], dim=-1).reshape(-1, 3)
    return ids.to(dtype)


def text_ids(seq_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[L_txt, 3] zeros: FLUX gives text tokens no spatial position."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def latent_size(resolution_h: int, resolution_w: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Latent grid (h, w) of an image; FLUX needs it even, so pixel sizes must be multiples of 16."""
    if resolution_h % (2 * vae_scale_factor) or resolution_w % (2 * vae_scale_factor):
        raise ValueError(
            f"image size {resolution_h}x{resolution_w} is not a multiple of {2 * vae_scale_factor} "
            "(the VAE downsamples x8 and FLUX packs 2x2 latent patches); use e.g. 512 or 1024"
        )
    return resolution_h // vae_scale_factor, resolution_w // vae_scale_factor


def normalize_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """x0 = (z - shift) * scale: the flow models' latent space."""
    return (z - vae_config.shift_factor) * vae_config.scaling_factor


def denormalize_latents(x0: torch.Tensor, vae_config) -> torch.Tensor:
    """Inverse of normalize_latents."""
    return x0 / vae_config.scaling_factor + vae_config.shift_factor


@torch.no_grad()
def encode_images(
    vae, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
) -> torch.Tensor:
    """Normalised latents [B, 16, h, w] of images in [-1, 1]: a posterior sample (seeded) or its mean."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    if sample:
        noise = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32, device="cpu")
        z = posterior.mean.float() + posterior.std.float() * noise.to(posterior.mean.device)
    else:
        z = posterior.mean.float()
    return normalize_latents(z, vae.config)


@torch.no_grad()
def decode_latents(vae, x0: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from normalised latents."""
    z = denormalize_latents(x0.float(), vae.config)
    return vae.decode(z.to(vae.device, vae.dtype)).sample.float()
