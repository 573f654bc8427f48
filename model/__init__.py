"""FLUX models, latents, text conditioning, time conventions and few-step pipelines."""

import common.cli  # noqa: F401  (drops transformers' torchvision notices before diffusers is imported)
