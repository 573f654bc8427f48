"""FLUX pipelines for the teacher (flow-match Euler), sCM, MeanFlow and SiD students.

Each is a diffusers FluxPipeline whose denoising loop is replaced by one of the samplers in
`model.samplers`; prompt encoding, latent noise, packing and VAE decoding are shared. Noise may come from one
generator or from one generator per image (`generator=[...]`), which makes every image independent of the
batch it is generated in. Noise is drawn on the CPU, so a seed gives the same images on every device.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from .conventions import (SIGMA_DATA, flux_mu, flux_times, scm_angles, trigflow_from_flow_velocity,
                          trigflow_to_flow_input)
from .latents import decode_latents, image_ids, latent_size, pack_latents, unpack_latents
from .samplers import sample_euler, sample_meanflow, sample_scm, sample_sid, sid_times
from .text import PromptEmbeds, encode_prompts

Generators = torch.Generator | list[torch.Generator] | None


def draw_noise(generator: Generators, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Unit Gaussian noise [batch, *shape] in fp32 on the CPU; a list holds one generator per sample."""
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generator])
    return torch.randn((batch, *shape), generator=generator, dtype=torch.float32)


class FewStepFluxPipeline(FluxPipeline):
    """Shared FLUX text-to-image pipeline; subclasses implement `denoise` (the sampling loop)."""

    default_num_inference_steps = 28

    def denoise(self, noise: torch.Tensor, model_kwargs: dict, num_inference_steps: int, guidance: torch.Tensor,
                fresh_noise) -> torch.Tensor:
        """Packed noise [B, L, 64] -> packed normalised latents x0 (fp32)."""
        raise NotImplementedError

    transformer_batch_size: int | None = None

    def predict(self, z: torch.Tensor, tau: torch.Tensor, guidance: torch.Tensor, model_kwargs: dict,
                **extra) -> torch.Tensor:
        """The transformer's output at flow time tau (broadcast to the batch), in fp32.

        With `transformer_batch_size` set, the batch runs in chunks of that many images: every call then has
        the same shape whatever the batch, so images are bitwise independent of how prompts were batched
        (matrix kernels pick different summation orders for different batch sizes).
        """
        batch = z.shape[0]
        per_sample = {
            "hidden_states": z.to(self.transformer.dtype),
            "timestep": tau.float().expand(batch).to(z.device),
            "guidance": guidance,
            "encoder_hidden_states": model_kwargs["encoder_hidden_states"],
            "pooled_projections": model_kwargs["pooled_projections"],
            **extra,
        }
        shared = {"txt_ids": model_kwargs["txt_ids"], "img_ids": model_kwargs["img_ids"], "return_dict": False}
        chunk = self.transformer_batch_size or batch
        outputs = [
            self.transformer(**{k: v[start:start + chunk] for k, v in per_sample.items()}, **shared)[0]
            for start in range(0, batch, chunk)
        ]
        return torch.cat(outputs).float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: Generators = None,
        max_sequence_length: int = 256,
        prompt_embeds: PromptEmbeds | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        transformer_batch_size: int | None = None,
    ):
        self.transformer_batch_size = transformer_batch_size
        device = self._execution_device
        steps = num_inference_steps or self.default_num_inference_steps
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass `prompt` or `prompt_embeds`")
            prompt_embeds = encode_prompts(
                prompt, self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                max_sequence_length, device,
            )
        cond = prompt_embeds.repeat_interleave(num_images_per_prompt).to(device, self.transformer.dtype)
        batch = len(cond)
        h, w = latent_size(height, width, self.vae_scale_factor)
        model_kwargs = {
            "encoder_hidden_states": cond.prompt_embeds,
            "pooled_projections": cond.pooled_prompt_embeds,
            "txt_ids": cond.text_ids,
            "img_ids": image_ids(h, w, device=device, dtype=cond.text_ids.dtype),
        }

        def fresh_noise(_step: int = 0) -> torch.Tensor:
            return pack_latents(draw_noise(generator, batch, (16, h, w))).to(device)

        guidance = torch.full((batch,), guidance_scale, dtype=torch.float32, device=device)
        x0 = self.denoise(fresh_noise(), model_kwargs, steps, guidance, fresh_noise)
        latents = unpack_latents(x0, h, w)
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(decode_latents(self.vae, latents), output_type=output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=images) if return_dict else (images,)


class FluxEulerPipeline(FewStepFluxPipeline):
    """The teacher's sampler: flow-match Euler on FLUX's shifted schedule (default 28 steps, guidance 3.5)."""

    def denoise(self, noise, model_kwargs, num_inference_steps, guidance, fresh_noise):
        times = flux_times(num_inference_steps, noise.shape[1], self.scheduler.config).to(noise.device)
        return sample_euler(lambda z, t: self.predict(z, t, guidance, model_kwargs), noise, times)


class FluxSCMPipeline(FewStepFluxPipeline):
    """sCM student sampler: TrigFlow denoise-then-renoise in 1-4 steps (angle 1.3 in the middle of 2 steps)."""

    default_num_inference_steps = 2
    sigma_data = SIGMA_DATA
    intermediate_angle: float | None = None

    def trigflow(self, x_tilde, s, guidance, model_kwargs):
        x_flow, tau = trigflow_to_flow_input(x_tilde, s)
        return trigflow_from_flow_velocity(x_tilde, s, self.predict(x_flow, tau, guidance, model_kwargs))

    def denoise(self, noise, model_kwargs, num_inference_steps, guidance, fresh_noise):
        angles = scm_angles(num_inference_steps, intermediate_angle=self.intermediate_angle).to(noise.device)
        return sample_scm(
            lambda x, s: self.trigflow(x, s, guidance, model_kwargs), noise, angles,
            lambda i: fresh_noise(i + 1), self.sigma_data,
        )


class FluxMeanFlowPipeline(FewStepFluxPipeline):
    """MeanFlow student sampler: z_r = z_t - (t - r) u(z_t, t, t - r) on FLUX's shifted schedule."""

    default_num_inference_steps = 4

    def denoise(self, noise, model_kwargs, num_inference_steps, guidance, fresh_noise):
        times = flux_times(num_inference_steps, noise.shape[1], self.scheduler.config).to(noise.device)

        def average_velocity(z, r, t):
            delta = (t - r).expand(z.shape[0])
            return self.predict(z, t, guidance, model_kwargs, timestep2=delta)

        return sample_meanflow(average_velocity, noise, times)


class FluxSiDPipeline(FewStepFluxPipeline):
    """SiD generator sampler: x0 = x_t - t G(x_t, t), re-noised to the next step time (METHODS 7.2).

    N steps run the first N times of the generator's K-step schedule t_i = t_init (1 - i / K) (`train_steps` =
    K; every prefix of it was trained by the uniform mixture), or of an N-step schedule when K is unknown.
    `noise_type` fresh | fixed | ddim, `init_time` and `time_shift` as in training. diffusers'
    FlowMatchLCMScheduler steps the same way for fresh noise only, with one generator for the batch, so the
    recursion is model.samplers.sample_sid (per-image CPU generators, all three noise types).
    """

    default_num_inference_steps = 4
    noise_type: str = "fresh"
    init_time: float = 1.0
    time_shift: bool = False
    train_steps: int | None = None

    def configure_generator(self, noise_type: str | None = None, init_time: float | None = None,
                            time_shift: bool | None = None, train_steps: int | None = None) -> "FluxSiDPipeline":
        """Set the generator's sampling settings (those it was trained with; None keeps the current one)."""
        for name, value in (("noise_type", noise_type), ("init_time", init_time), ("time_shift", time_shift),
                            ("train_steps", train_steps)):
            if value is not None:
                setattr(self, name, value)
        return self

    def denoise(self, noise, model_kwargs, num_inference_steps, guidance, fresh_noise):
        mu = flux_mu(noise.shape[1]) if self.time_shift else None
        times = sid_times(num_inference_steps, self.train_steps, self.init_time, mu).to(noise.device)

        def x0_of(x, t, i):
            return x - t * self.predict(x, t, guidance, model_kwargs)

        return sample_sid(x0_of, noise, times, self.noise_type, fresh_noise)
