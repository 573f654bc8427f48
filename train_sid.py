"""SiD few-step distillation of a FLUX teacher: data-free Score identity Distillation (LSG / Zero-CFG / Anti-CFG).

    python train_sid.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B --prompts_file prompts.txt \\
        --ds_file parallel_config/deepspeed_bf16_batch8.json --train_batch_size 8 --output_dir out/sid

Three networks (model/sid.py, METHODS 7): the frozen teacher f_phi (the original x1000 FLUX, or the x1 model of
--rescaled_checkpoint_path), the K-step generator G_theta and the fake score f_psi, both initialised from the
teacher. Each iteration draws k ~ U{1..K} (the same on every rank) and runs two updates on two prompt batches:
  1. fake score: x_g = k generator steps (no grad); L_psi = ||f_psi^kappa1(x_s, s, c) - (eps - x_g)||^2
     (+ the Diffusion-GAN discriminator loss with --gan);
  2. generator: x_g = k steps, the last with grad; L_G = w (y_r - y_f)((y_r - x_g) - alpha (y_r - y_f)) with y_r,
     y_f the x0 predictions of the teacher (kappa4) and the fake score (kappa2 = kappa3) at x_s.
Data-free: the prompts come from --prompts_file or the caption column of the data flags; no image is decoded
unless --gan (then real images feed the discriminator only).
"""

import math
import os

import torch
from accelerate import PartialState

from common.cli import (UsageError, finite_float, nonnegative_float, nonnegative_int, positive_float, positive_int,
                        probability, run)
from model.loading import load_transformer
from model.pipeline import FluxSiDPipeline
from model.samplers import NOISE_TYPES
from model.sid import (STRATEGIES, WEIGHTINGS, SiDConfig, draw_k, draw_noise_level, fake_score_objective,
                       finite_samples, gan_schedule, generate, generator_objective)
from training import DistillationMethod, NetworkSpec, Phase, Trainer, training_parser

EMPTY_PROMPT = ""  # the unconditional prompt of every kappa (METHODS 7.9)


class SiD(DistillationMethod):
    name = "SiD"
    tracker_project = "flux_sid"
    pipeline_cls = FluxSiDPipeline
    export_network = "generator"

    def __init__(self, args):
        super().__init__(args)
        self.needs_images = args.gan
        kappas = SiDConfig.preset(args.guidance_strategy, args.lsg_kappa, args.anti_cfg_scale)
        given = {f"kappa{i}": getattr(args, f"kappa{i}") for i in range(1, 5) if getattr(args, f"kappa{i}") is not None}
        if ("kappa2" in given) != ("kappa3" in given):  # one fake-score scale in L_G: the other follows
            given["kappa3" if "kappa2" in given else "kappa2"] = given.get("kappa2", given.get("kappa3"))
        kappas.update(given)
        self.config = SiDConfig(
            num_generator_steps=args.num_generator_steps, init_time=args.init_time,
            time_shift=args.generator_time_shift, noise_type=args.noise_type, time_mean=args.sid_time_mean,
            time_std=args.sid_time_std, alpha=args.sid_alpha, weighting=args.sid_weighting, ls=args.sid_ls,
            lsg=args.sid_lsg, lsd=args.sid_lsd, lsg_gan=args.sid_lsg_gan, **kappas,
            teacher_guidance=args.teacher_guidance, generator_guidance=args.generator_guidance,
            fake_guidance=args.fake_guidance, prompt_dropout=args.prompt_dropout, gan=args.gan,
            gan_generator_start_images=args.gan_generator_start_images,
            gan_adv_start_images=args.gan_adv_start_images,
        )
        if args.validation_guidance_scale is None:
            args.validation_guidance_scale = args.generator_guidance
        self.k_history: list[int] = []

    # ----- networks -----
    def build_networks(self, components, dtype, device):
        args = self.args
        self.empty = components.encode([EMPTY_PROMPT], args.max_sequence_length, device)
        teacher, fake, generator = self.load_teacher(dtype), self.load_network(), self.load_network()
        self.time_input_scale = generator.config.time_input_scale
        self.latent_channels = generator.config.in_channels
        hooks = [nan_to_num_hook(args.nan_to_num)] if args.nan_to_num else []
        for net in (fake, generator, teacher):  # the generator's gradient passes through the teacher too
            if args.gradient_checkpointing:
                net.enable_gradient_checkpointing()
        fake_spec = NetworkSpec(fake, learning_rate=args.fake_learning_rate, max_grad_norm=args.fake_max_grad_norm,
                                ema_decay=args.fake_ema_decay, grad_hooks=hooks)
        generator_spec = NetworkSpec(generator, ema_decay=args.ema_decay, grad_hooks=hooks)
        return {"fake_score": fake_spec, "generator": generator_spec}, teacher

    def load_network(self, dtype=torch.float32):
        """A trained network's starting point: the teacher's weights (the x1 model with --rescaled_checkpoint_path)."""
        args = self.args
        scale = 1.0 if args.rescaled_checkpoint_path else None  # None: the model's own (FLUX: x1000)
        return load_transformer(args.pretrained_model_name_or_path, weights_path=args.rescaled_checkpoint_path,
                                time_input_scale=scale, dtype=dtype, revision=args.revision, variant=args.variant,
                                cache_dir=args.cache_dir)

    def load_teacher(self, dtype):
        return self.load_network(dtype)

    def network_clipping(self) -> dict[str, float]:
        fake = self.args.fake_max_grad_norm
        return {"fake_score": self.args.max_grad_norm if fake is None else fake, "generator": self.args.max_grad_norm}

    def phases(self):
        return [Phase("fake_score", self.fake_score_loss),
                Phase("generator", self.generator_loss, active=self.generator_active, frozen=("fake_score",),
                      images=False)]  # real images feed the discriminator only, in the fake-score phase

    # ----- one iteration -----
    def images_seen(self, step: int) -> int:
        args = self.args
        return step * args.train_batch_size * args.gradient_accumulation_steps * PartialState().num_processes

    def generator_active(self, step: int) -> bool:
        return gan_schedule(self.images_seen(step), self.config)[0]

    def draw(self, batch, step, generator, nets, grad: bool):
        """k, and x_g from k generator steps on this batch's prompts (the last step with grad if `grad`)."""
        k = draw_k(self.args.seed, step, self.config.num_generator_steps)
        h, w = batch.latent_size
        shape = (len(batch), (h // 2) * (w // 2), self.latent_channels)
        device = batch.img_ids.device

        def noise(_step=0):
            return torch.randn(shape, generator=generator).to(device)

        x_g = generate(nets.wrapped("generator"), noise(), k, batch.cond, batch.img_ids, self.config, noise, grad)
        return k, x_g

    def fake_score_loss(self, nets, teacher, batch, step, generator):
        cfg = self.config
        k, x_g = self.draw(batch, step, generator, nets, grad=False)
        if not self.k_history or self.k_history[-1][0] != step:
            self.k_history.append((step, k))
        cond = batch.cond
        if cfg.uses_prompt_dropout:  # the fake score also learns the empty prompt (METHODS 7.3)
            drop = torch.rand(len(batch), generator=generator) < cfg.prompt_dropout
            cond = cond.where(drop, self.empty)
        keep = finite_samples(x_g)  # non-finite samples are dropped and counted (METHODS 7.3)
        s = draw_noise_level(len(batch), generator, cfg).to(x_g.device)[keep]
        eps = torch.randn(x_g.shape, generator=generator).to(x_g.device)[keep]
        x_real = batch.x0[keep] if cfg.gan else None  # real images, noised like x_g, with their own captions
        loss, logs = fake_score_objective(nets.wrapped("fake_score"), x_g[keep], s, eps, cond.index(keep),
                                          self.empty, batch.img_ids, cfg, x_real, batch_size=len(batch))
        return loss, {**logs, "k": float(k), "dropped_samples": float((~keep).sum())}

    def generator_loss(self, nets, teacher, batch, step, generator):
        cfg = self.config
        _, gan_mix = gan_schedule(self.images_seen(step), cfg)
        k, x_g = self.draw(batch, step, generator, nets, grad=True)
        keep = finite_samples(x_g)
        s = draw_noise_level(len(batch), generator, cfg).to(x_g.device)[keep]
        eps = torch.randn(x_g.shape, generator=generator).to(x_g.device)[keep]
        # the fake score is frozen through this phase (Phase.frozen); gradients flow through its input
        loss, logs = generator_objective(teacher, nets.plain("fake_score"), x_g[keep], s, eps, batch.cond.index(keep),
                                         self.empty, batch.img_ids, cfg, gan_mix, batch_size=len(batch))
        return loss, {**logs, "dropped_samples_generator": float((~keep).sum())}

    # ----- sampling settings, per-rank state -----
    def configure_pipeline(self, pipe):
        cfg = self.config
        pipe.configure_generator(cfg.noise_type, cfg.init_time, cfg.time_shift, cfg.num_generator_steps)

    def export_metadata(self) -> dict:
        cfg = self.config
        return {"method": "sid", "train_steps": cfg.num_generator_steps, "init_time": cfg.init_time,
                "time_shift": cfg.time_shift, "noise_type": cfg.noise_type, "guidance_scale": cfg.generator_guidance,
                "time_input_scale": float(self.time_input_scale)}

    def rank_state(self) -> dict:
        return {"k_history": [list(item) for item in self.k_history]}

    def load_rank_state(self, state: dict) -> None:
        self.k_history = [tuple(item) for item in state.get("k_history", [])]


def nan_to_num_hook(limit: float):
    """Gradient hook: NaN -> 0 and +-inf -> +-limit (SiD-DiT's guard, METHODS 7.3)."""
    def hook(grad):
        return torch.nan_to_num(grad, nan=0.0, posinf=limit, neginf=-limit)
    return hook


def parse_args(argv=None):
    parser = training_parser(__doc__.splitlines()[0])
    parser.set_defaults(learning_rate=1e-6, adam_beta1=0.0, adam_weight_decay=0.0, validation_guidance_scale=None)
    g = parser.add_argument_group("SiD")
    g.add_argument("--prompts_file", default=None,
                   help="one prompt per line (data-free); default: the caption column of the data flags")
    g.add_argument("--num_generator_steps", type=positive_int, default=4, help="K: the generator's steps")
    g.add_argument("--init_time", type=positive_float, default=1.0, help="t_init of t_i = t_init (1 - i/K)")
    g.add_argument("--generator_time_shift", action="store_true",
                   help="shift the generator's step times like FLUX's resolution-dependent schedule")
    g.add_argument("--noise_type", choices=NOISE_TYPES, default="fresh")
    g.add_argument("--guidance_strategy", choices=STRATEGIES, default="lsg",
                   help="presets kappa1..kappa4: lsg = --lsg_kappa everywhere; zero_cfg: teacher 1, fake score 0 "
                        "(empty prompt); anti_cfg: teacher 1, fake score --anti_cfg_scale in the generator loss")
    g.add_argument("--lsg_kappa", type=finite_float, default=1.0)
    g.add_argument("--anti_cfg_scale", type=finite_float, default=-1.0)
    for i, role in ((1, "fake score in its own loss"), (2, "fake score in the generator loss"),
                    (3, "fake score in the generator loss (= kappa2)"), (4, "teacher")):
        g.add_argument(f"--kappa{i}", type=finite_float, default=None, help=f"true-CFG scale of the {role}")
    g.add_argument("--teacher_guidance", type=nonnegative_float, default=3.5,
                   help="FLUX guidance-embedding value fed to the teacher")
    g.add_argument("--generator_guidance", type=nonnegative_float, default=3.5,
                   help="... to the generator (and at sampling)")
    g.add_argument("--fake_guidance", type=nonnegative_float, default=3.5, help="... to the fake score")
    g.add_argument("--sid_alpha", type=finite_float, default=1.0)
    g.add_argument("--sid_weighting", choices=list(WEIGHTINGS), default="1_minus_sigma")
    g.add_argument("--sid_time_mean", type=finite_float, default=math.log(2.0),
                   help="s = sigmoid(N(mean, std^2)) for both losses")
    g.add_argument("--sid_time_std", type=positive_float, default=1.6)
    g.add_argument("--sid_ls", type=positive_float, default=1.0, help="fake-score loss scale")
    g.add_argument("--sid_lsg", type=positive_float, default=100.0, help="generator loss scale (SiD-DiT: 100)")
    g.add_argument("--sid_lsd", type=positive_float, default=1.0, help="discriminator loss scale")
    g.add_argument("--sid_lsg_gan", type=positive_float, default=1.0, help="adversarial loss scale")
    g.add_argument("--prompt_dropout", type=probability, default=0.1,
                   help="share of fake-score prompts replaced by '' when kappa1 or kappa2 is not 1")
    g.add_argument("--fake_learning_rate", type=positive_float, default=None, help="default: --learning_rate")
    g.add_argument("--fake_max_grad_norm", type=nonnegative_float, default=None, help="default: --max_grad_norm")
    g.add_argument("--fake_ema_decay", type=positive_float, default=None)
    g.add_argument("--nan_to_num", type=nonnegative_float, default=1e5,
                   help="gradients: NaN -> 0, inf -> +-this (0 disables)")
    g.add_argument("--gan", action="store_true",
                   help="Diffusion-GAN term; needs a text-image dataset (real images feed the discriminator only)")
    g.add_argument("--gan_generator_start_images", type=nonnegative_int, default=20_000,
                   help="the generator waits this many images (the fake score / discriminator learn first)")
    g.add_argument("--gan_adv_start_images", type=nonnegative_int, default=40_000,
                   help="from here the generator uses (L_G + L_adv) / 2")
    args = parser.parse_args(argv)
    if args.gan and args.prompts_file:
        raise UsageError("--gan takes prompts and real images from the data flags (--dataset_name / --data_files); "
                         "drop --prompts_file")
    if args.gan and not (args.dataset_name or args.data_files):
        raise UsageError("--gan needs real text-image pairs: pass --dataset_name or --data_files")
    if not args.prompts_file and not (args.dataset_name or args.data_files):
        raise UsageError("no prompts: pass --prompts_file (one prompt per line), or --dataset_name / --data_files "
                         "with a caption column")
    if args.prompts_file and not os.path.isfile(os.path.expanduser(args.prompts_file)):
        raise UsageError(f"--prompts_file {args.prompts_file} does not exist; pass a text file with one prompt "
                         "per line")
    args.allow_unrescaled_teacher = True  # SiD needs no JVP, so the original x1000 teacher is the default
    return args


def main(argv=None):
    args = parse_args(argv)
    return Trainer(args, SiD(args)).train()


if __name__ == "__main__":
    run(main)
