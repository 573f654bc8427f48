"""FLUX models, latents, text conditioning, time conventions and few-step pipelines."""
