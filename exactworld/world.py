"""An exact-teacher world: per-prompt Gaussian mixtures whose flow velocity is known in closed form.

Data for prompt c is a mixture of isotropic Gaussians, x0 ~ sum_k pi_{k|c} N(mu_k, s^2 I), in the packed latent
shape the losses take ([B, L, C], d = L C). The mode means lie in a 2-D plane of R^d (a random orthonormal pair of
directions, so the plane is spread over every token and channel) on a jittered grid whose points are dealt out to
the prompts at random: neighbouring modes mostly belong to different prompts, so a blurry sampler (or one that
collapses onto a prompt's mean) lands nearer another prompt's mode and loses mode accuracy. The empty prompt is
the mixture of all prompts (equal prompt weights).

Rectified-flow path (t = 1 is noise): x_t = (1 - t) x0 + t eps. Given mode k, x_t ~ N((1 - t) mu_k, S_t^2 I) with
S_t^2 = (1 - t)^2 s^2 + t^2, and

    E[eps | x_t, k] = t (x_t - (1 - t) mu_k) / S_t^2,   E[x0 | x_t, k] = mu_k + (1 - t) s^2 (x_t - (1 - t) mu_k) / S_t^2,

so v_k = E[eps - x0 | x_t, k] = a_t (x_t - (1 - t) mu_k) - mu_k with a_t = (t - (1 - t) s^2) / S_t^2, and the
teacher's velocity is v(x_t, t, c) = sum_k w_k(x_t) v_k with posterior weights
w_k proportional to pi_{k|c} exp(-||x_t - (1 - t) mu_k||^2 / (2 S_t^2)) (one s for every mode, so the Gaussians'
normalisers cancel). Guidance at scale g is the usual CFG mix v_g = v("") + g (v(c) - v("")), fed through the
transformer's guidance input (the guidance-embedding convention of FLUX).

Metrics (`evaluate_samples`), per prompt then averaged over prompts:
- sliced Wasserstein-2 between two sample sets: sqrt of the mean over `SW_DIRECTIONS` fixed random unit
  directions of R^d of the 1-D W2^2 between the sorted projections (equal sizes);
- mode accuracy: the share of a prompt's samples whose nearest mode belongs to that prompt;
- mode-weight total variation: 0.5 sum_k |p_k - q_k| between the nearest-mode histograms (over all modes) of the
  samples and of the reference samples (and, as `mode_tv_true`, against the mixture's own weights pi_{k|c}, which
  the reference equals only at guidance 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from model.text import PromptEmbeds

Tensor = torch.Tensor
SW_DIRECTIONS = 256
EMPTY_PROMPTS = ("", " ")  # the empty prompt ("", SiD) and the reference's negative prompt (" ", MeanFlow)


@dataclass(frozen=True)
class WorldConfig:
    """The world's shape and difficulty. d = num_tokens * channels; 24 modes on a 5 x 5 grid by default."""

    num_prompts: int = 8
    modes_per_prompt: int = 3
    num_tokens: int = 4
    channels: int = 4
    spacing: float = 2.0  # grid step of the mode means in their plane
    jitter: float = 0.25  # uniform jitter of each grid point, in grid steps
    mode_std: float = 0.3  # s, the std of every mode in every direction
    guidance: float = 2.0  # the CFG scale the students learn and are scored at
    seed: int = 0

    @property
    def dim(self) -> int:
        return self.num_tokens * self.channels

    @property
    def num_modes(self) -> int:
        return self.num_prompts * self.modes_per_prompt

    def to_dict(self) -> dict:
        return asdict(self)


class GaussianMixtureWorld:
    """Prompts, modes and the closed-form teacher of `WorldConfig` (all tensors fp64 on the CPU)."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = c = config
        gen = torch.Generator().manual_seed(c.seed)
        side = math.ceil(math.sqrt(c.num_modes))
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        grid = grid[torch.randperm(len(grid), generator=gen)[: c.num_modes]].double()
        grid = grid - (side - 1) / 2 + c.jitter * (2 * torch.rand(c.num_modes, 2, generator=gen, dtype=torch.float64) - 1)
        self.plane_coords = c.spacing * grid  # [M, 2]
        basis, _ = torch.linalg.qr(torch.randn(c.dim, 2, generator=gen, dtype=torch.float64))
        self.basis = basis  # [d, 2], orthonormal columns
        self.means = self.plane_coords @ basis.T  # [M, d]
        # modes dealt to prompts at random: prompt of mode m
        self.mode_prompt = torch.randperm(c.num_modes, generator=gen) % c.num_prompts
        # unequal weights within a prompt (so weight errors show), prompts equally likely in the empty prompt
        raw = 0.5 + torch.rand(c.num_modes, generator=gen, dtype=torch.float64)
        weights = torch.zeros(c.num_prompts + 1, c.num_modes, dtype=torch.float64)
        for p in range(c.num_prompts):
            mask = self.mode_prompt == p
            weights[p, mask] = raw[mask] / raw[mask].sum()
        weights[c.num_prompts] = weights[: c.num_prompts].mean(0)
        self.mode_weights = weights  # [P + 1, M]: pi_{k|c}; row P is the empty prompt
        self.prompts = [f"prompt {p}" for p in range(c.num_prompts)]

    # ----- prompts -----
    @property
    def empty_id(self) -> int:
        return self.config.num_prompts

    def prompt_ids(self, captions: list[str]) -> Tensor:
        """Caption -> prompt index (the empty prompt "" or " " -> `empty_id`); anything else is refused."""
        lookup = {p: i for i, p in enumerate(self.prompts)}
        ids = []
        for caption in captions:
            if caption in EMPTY_PROMPTS:
                ids.append(self.empty_id)
            elif caption.strip() in lookup:
                ids.append(lookup[caption.strip()])
            else:
                raise ValueError(f"{caption!r} is not a prompt of this exact world; use one of {self.prompts[:3]}... "
                                 "or the empty prompt")
        return torch.tensor(ids, dtype=torch.long)

    def encode_ids(self, ids: Tensor, dtype=torch.float32, device=None) -> PromptEmbeds:
        """One-hot text conditioning: T5 sequence [B, 1, P + 1], pooled [B, P + 1], text ids [1, 3]."""
        onehot = torch.nn.functional.one_hot(ids, self.config.num_prompts + 1).to(dtype)
        return PromptEmbeds(onehot[:, None, :].to(device), onehot.to(device), torch.zeros(1, 3, dtype=dtype, device=device))

    def encode(self, captions: list[str], dtype=torch.float32, device=None) -> PromptEmbeds:
        return self.encode_ids(self.prompt_ids(captions), dtype, device)

    @staticmethod
    def ids_from_embeds(pooled: Tensor) -> Tensor:
        """The prompt index a one-hot pooled embedding stands for."""
        return pooled.argmax(-1)

    # ----- data -----
    def latent_shape(self, batch: int) -> tuple[int, int, int]:
        return batch, self.config.num_tokens, self.config.channels

    def sample_modes(self, ids: Tensor, generator: torch.Generator) -> Tensor:
        """Mode index per sample, drawn from the prompt's weights."""
        return torch.multinomial(self.mode_weights[ids], 1, generator=generator).squeeze(1)

    def sample(self, ids: Tensor, generator: torch.Generator, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """(x0 packed [B, L, C], mode index [B]) for prompt indices `ids`, from `generator` only."""
        modes = self.sample_modes(ids, generator)
        noise = torch.randn(len(ids), self.config.dim, generator=generator, dtype=torch.float64)
        x0 = self.means[modes] + self.config.mode_std * noise
        return x0.reshape(self.latent_shape(len(ids))).to(dtype), modes

    # ----- the teacher -----
    def velocity(self, x: Tensor, t: Tensor, ids: Tensor, guidance: Tensor | float | None = None) -> Tensor:
        """The exact (guided) flow velocity at packed x [B, L, C], flow time t [B], prompts `ids` [B], in x's dtype.

        v_g = v("") + g (v(c) - v("")) for prompted samples; the empty prompt's own samples get v(""). Differentiable
        in x (SiD's generator loss passes gradients through the teacher's input)."""
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(len(x), -1)
        means, weights = self.means.to(flat), self.mode_weights.to(flat)
        t = torch.as_tensor(t, dtype=flat.dtype, device=flat.device).reshape(-1).expand(len(x))
        v_c = mixture_velocity(flat, t, means, weights[ids.to(flat.device)], self.config.mode_std)
        if guidance is None:
            return v_c.reshape(shape).to(dtype)
        g = torch.as_tensor(guidance, dtype=flat.dtype, device=flat.device).reshape(-1).expand(len(x))[:, None]
        empty = torch.full_like(ids, self.empty_id).to(flat.device)
        v_u = mixture_velocity(flat, t, means, weights[empty], self.config.mode_std)
        guided = torch.where((ids.to(flat.device) == self.empty_id)[:, None], v_u, v_u + g * (v_c - v_u))
        return guided.reshape(shape).to(dtype)

    def log_density(self, x: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        """log p_t(x | c) of the noised mixture (for tests: v = (-t grad log p_t - x) / (1 - t))."""
        flat = x.reshape(len(x), -1)
        t = torch.as_tensor(t, dtype=flat.dtype).reshape(-1, 1).expand(len(x), 1)
        var = (1 - t) ** 2 * self.config.mode_std ** 2 + t ** 2  # [B, 1]
        d = flat.shape[1]
        sq = (flat[:, None, :] - (1 - t)[:, :, None] * self.means.to(flat)[None]).square().sum(-1)  # [B, M]
        log_w = self.mode_weights.to(flat)[ids].log()
        return torch.logsumexp(log_w - sq / (2 * var), dim=1) - 0.5 * d * torch.log(2 * math.pi * var.squeeze(1))

    # ----- evaluation -----
    def nearest_mode(self, x: Tensor) -> Tensor:
        flat = x.reshape(len(x), -1).double()
        return torch.cdist(flat, self.means).argmin(1)


def mixture_velocity(x: Tensor, t: Tensor, means: Tensor, weights: Tensor, std: float) -> Tensor:
    """E[eps - x0 | x_t = x] for x0 ~ sum_k weights[b, k] N(means[k], std^2 I); x [B, d], t [B], weights [B, M]."""
    t = t[:, None]
    var = (1 - t) ** 2 * std ** 2 + t ** 2  # S_t^2, [B, 1]
    centred = x[:, None, :] - (1 - t)[:, :, None] * means[None]  # [B, M, d]
    logits = weights.clamp_min(0).log() - centred.square().sum(-1) / (2 * var)
    w = torch.softmax(logits, dim=1)  # posterior mode weights [B, M]
    a = (t - (1 - t) * std ** 2) / var  # [B, 1]
    mean_mu = w @ means  # sum_k w_k mu_k, [B, d]
    return a * x - (a * (1 - t) + 1) * mean_mu


# ----- metrics -----
def sw_directions(dim: int, count: int = SW_DIRECTIONS, seed: int = 1234) -> Tensor:
    d = torch.randn(dim, count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return d / d.norm(dim=0, keepdim=True)


def sliced_w2(a: Tensor, b: Tensor, directions: Tensor) -> float:
    """Sliced Wasserstein-2 between equal-size sample sets a, b [N, d] over fixed unit `directions` [d, K]."""
    if len(a) != len(b):
        raise ValueError(f"sliced_w2 compares equal-size sample sets, got {len(a)} and {len(b)}")
    pa = (a.reshape(len(a), -1).double() @ directions).sort(0).values
    pb = (b.reshape(len(b), -1).double() @ directions).sort(0).values
    return float((pa - pb).square().mean().sqrt())


def mode_histogram(modes: Tensor, num_modes: int) -> Tensor:
    return torch.bincount(modes, minlength=num_modes).double() / max(1, len(modes))


def evaluate_samples(world: GaussianMixtureWorld, samples: Tensor, ids: Tensor, reference: Tensor,
                     directions: Tensor | None = None) -> dict[str, float]:
    """Distance, mode accuracy and mode-weight TV of `samples` against `reference` (same prompts `ids`, same
    order), each computed per prompt and averaged over prompts."""
    directions = sw_directions(world.config.dim) if directions is None else directions
    M = world.config.num_modes
    modes, ref_modes = world.nearest_mode(samples), world.nearest_mode(reference)
    out = {"distance": [], "mode_accuracy": [], "mode_tv": [], "mode_tv_true": []}
    for p in ids.unique().tolist():
        sel = ids == p
        out["distance"].append(sliced_w2(samples[sel], reference[sel], directions))
        out["mode_accuracy"].append(float((world.mode_prompt[modes[sel]] == p).double().mean()))
        hist = mode_histogram(modes[sel], M)
        out["mode_tv"].append(float(0.5 * (hist - mode_histogram(ref_modes[sel], M)).abs().sum()))
        out["mode_tv_true"].append(float(0.5 * (hist - world.mode_weights[p]).abs().sum()))
    return {k: sum(v) / len(v) for k, v in out.items()}


def per_sample_error(samples: Tensor, reference: Tensor) -> float:
    """Root mean squared distance between paired samples (the same noise), per sample over all elements."""
    diff = samples.reshape(len(samples), -1).double() - reference.reshape(len(reference), -1).double()
    return float(diff.square().mean(1).sqrt().mean())
