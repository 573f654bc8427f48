"""FLUX models, latents, text conditioning, time conventions and few-step pipelines."""

import common.cli  # (drops transformers' torchvision notices before diffusers is imported)

common.cli.quiet_libraries()
