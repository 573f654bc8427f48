"""sCM distillation of a FLUX teacher into a 1-4 step student (continuous-time consistency, TrigFlow form).

    python train_sCM.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --rescaled_checkpoint_path rescaled.pt --dataset_name brivangl/midjourney-v6-llava \\
        --ds_file parallel_config/deepspeed_bf16_batch8.json --train_batch_size 8 --output_dir out/scm

The loss (model/scm.py, METHODS 3): the student F_theta and the frozen teacher are x1 flow transformers seen
through the TrigFlow wrapper; the target is built from the teacher's PF-ODE direction and the JVP of the
student along it, with tangent warmup and normalisation, 1/sigma weighting and an adaptive log-variance.
"""

import torch

from common.cli import finite_float, nonnegative_float, nonnegative_int, positive_float, run
from model.attention import use_jvp_attention
from model.pipeline import FluxSCMPipeline
from model.scm import SCMConfig, TrigFlowModel, scm_loss
from training import DistillationMethod, Trainer, load_rescaled, training_parser


class SCM(DistillationMethod):
    needs_rescaled = True
    name = "sCM"
    tracker_project = "flux_sCM"
    pipeline_cls = FluxSCMPipeline

    def __init__(self, args):
        super().__init__(args)
        self.config = SCMConfig(
            sigma_data=args.sigma_data,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            guidance_scales=tuple(args.scm_cfg_scale),
            tangent_warmup_steps=args.tangent_warmup_steps,
            scm_lambda=args.scm_lambda,
        )

    def build(self, components, dtype, device):
        teacher = TrigFlowModel(load_rescaled(self.args, dtype))
        net = use_jvp_attention(load_rescaled(self.args, torch.float32))
        if self.args.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        student = TrigFlowModel(net, logvar_head=True, generator=torch.Generator().manual_seed(self.args.seed))
        return student, teacher

    def loss(self, student, teacher, batch, step, generator, forward=None):
        return scm_loss(student, teacher, batch.x0, batch.cond, batch.img_ids, step, self.config, generator,
                        student_forward=forward)

    def export_transformer(self, student):
        return student.transformer


def parse_args(argv=None):
    parser = training_parser(__doc__.splitlines()[0])
    g = parser.add_argument_group("sCM")
    g.add_argument("--logit_mean", type=finite_float, default=0.0, help="P_mean of sigma = exp(P_mean + P_std n)")
    g.add_argument("--logit_std", type=nonnegative_float, default=1.0, help="P_std of sigma = exp(P_mean + P_std n)")
    g.add_argument("--sigma_data", type=positive_float, default=0.5)
    g.add_argument("--scm_cfg_scale", type=nonnegative_float, nargs="+", default=[4.0, 4.5, 5.0],
                   help="guidance scales the teacher and student are fed (one drawn per sample)")
    g.add_argument("--tangent_warmup_steps", type=nonnegative_int, default=4000)
    g.add_argument("--scm_lambda", type=positive_float, default=1.0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return Trainer(args, SCM(args)).train()


if __name__ == "__main__":
    run(main)
