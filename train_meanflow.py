"""MeanFlow distillation of a FLUX teacher into a 1-4 step dual-timestep student, with CFG-MeanFlow.

    python train_meanflow.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --rescaled_checkpoint_path rescaled.pt --dataset_name brivangl/midjourney-v6-llava \\
        --ds_file parallel_config/deepspeed_bf16_batch8.json --train_batch_size 8 --output_dir out/meanflow \\
        --use_cfg_meanflow True --cfg_omega 1.0 --cfg_kappa 0.5

The loss (model/meanflow.py, METHODS 4): the student u_theta(z_t, r, t) learns the average velocity with
target u_tgt = v - (t - r) du/dt, where v is the frozen teacher's velocity (optionally CFG-mixed with the
student's own conditional / unconditional predictions) and du/dt the JVP along (v, 0, 1); adaptive weighting.
Where the reference is inconsistent, the consistent choice is the default and the reference's behaviour is a
flag: --jvp_tangent data (reference) | teacher, --cfg_delta t_minus_r (reference) | zero.
"""

import torch

from common.cli import finite_float, nonnegative_float, positive_float, probability, run
from model.attention import use_jvp_attention
from model.meanflow import MeanFlowConfig, meanflow_loss
from model.pipeline import FluxMeanFlowPipeline
from training import DistillationMethod, Trainer, load_rescaled, str2bool, training_parser

NEGATIVE_PROMPT = " "  # the reference's unconditional prompt: a single space, not the empty string


class MeanFlow(DistillationMethod):
    needs_rescaled = True
    name = "MeanFlow"
    tracker_project = "flux_meanflow"
    pipeline_cls = FluxMeanFlowPipeline

    def __init__(self, args):
        super().__init__(args)
        self.config = MeanFlowConfig(
            time_sampler=args.time_sampler,
            time_mu=args.time_mu,
            time_sigma=args.time_sigma,
            ratio_r_not_equal_t=args.ratio_r_not_equal_t,
            weighting=args.weighting,
            adaptive_p=args.adaptive_p,
            high_order_gamma=args.high_order_gamma,
            path_type=args.path_type,
            cfg_prob=args.cfg_prob,
            guidance_scales=tuple(args.cfg_scale),
            use_cfg_meanflow=args.use_cfg_meanflow,
            cfg_omega=args.cfg_omega,
            cfg_kappa=args.cfg_kappa,
            cfg_min_t=args.cfg_min_t,
            cfg_max_t=args.cfg_max_t,
            jvp_tangent=args.jvp_tangent,
            cfg_delta=args.cfg_delta,
        )

    def build(self, components, dtype, device):
        self.neg_cond = components.encode([NEGATIVE_PROMPT], self.args.max_sequence_length, device)
        teacher = load_rescaled(self.args, dtype)
        student = load_rescaled(self.args, torch.float32, dual_timestep=True, zero_init_dual=self.args.zero_init_dual)
        use_jvp_attention(student)
        if self.args.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student, teacher

    def loss(self, student, teacher, batch, step, generator, forward=None):
        return meanflow_loss(forward if forward is not None else student, teacher, batch.x0, batch.cond,
                             self.neg_cond, batch.img_ids, self.config, generator)


def parse_args(argv=None):
    parser = training_parser(__doc__.splitlines()[0])
    g = parser.add_argument_group("MeanFlow")
    g.add_argument("--cfg_scale", type=nonnegative_float, nargs="+", default=[4.0, 4.5, 5.0],
                   help="guidance scales fed to teacher and student (one drawn per sample)")
    g.add_argument("--time_sampler", choices=["logit_normal", "uniform"], default="logit_normal")
    g.add_argument("--time_mu", type=finite_float, default=-0.4)
    g.add_argument("--time_sigma", type=positive_float, default=1.0)
    g.add_argument("--ratio_r_not_equal_t", type=probability, default=0.75,
                   help="fraction of samples with r != t (0.75 means P(r = t) = 0.25)")
    g.add_argument("--adaptive_p", type=nonnegative_float, default=1.0)
    g.add_argument("--weighting", choices=["adaptive", "high_order", "uniform"], default="adaptive",
                   help="high_order: the paper's gamma loss (weight sg(L_b + c)^(gamma - 1))")
    g.add_argument("--high_order_gamma", type=positive_float, default=2.0)
    g.add_argument("--path_type", choices=["linear"], default="linear")
    g.add_argument("--cfg_prob", type=probability, default=0.1, help="label dropout to the ' ' prompt")
    g.add_argument("--use_cfg_meanflow", type=str2bool, nargs="?", const=True, default=False)
    g.add_argument("--cfg_omega", type=finite_float, default=1.0)
    g.add_argument("--cfg_kappa", type=finite_float, default=0.0)
    g.add_argument("--cfg_min_t", type=probability, default=0.0)
    g.add_argument("--cfg_max_t", type=probability, default=1.0)
    g.add_argument("--jvp_tangent", choices=["teacher", "data"], default="teacher",
                   help="z-tangent of the JVP: the teacher (or CFG-mixed) velocity, or the reference's data velocity")
    g.add_argument("--cfg_delta", choices=["zero", "t_minus_r"], default="zero",
                   help="t - r fed to the CFG branch: 0 (MeanFlow paper) or the reference's t - r")
    g.add_argument("--zero_init_dual", action="store_true",
                   help="zero the second time embedder's output layer so the student starts equal to the teacher")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return Trainer(args, MeanFlow(args)).train()


if __name__ == "__main__":
    run(main)
