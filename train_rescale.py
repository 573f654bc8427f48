"""Make the rescaled (x1 time input) teacher that sCM and MeanFlow start from, by self-distillation.

    python train_rescale.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --dataset_name brivangl/midjourney-v6-llava --ds_file parallel_config/deepspeed_bf16_batch8.json \\
        --train_batch_size 8 --learning_rate 1e-5 --max_train_steps 4000 --output_dir out/rescaled
    python train_rescale.py ... --eval_only --rescaled_checkpoint_path out/rescaled/rescaled.pt

The original transformer (time and guidance x1000 inside) is frozen; an identical x1 student starts from its
weights (or, with --init remap, from the frequency-remapped embedders of METHODS 2.2) and learns to match its
velocity for the same x_tau, tau and g (smooth-L1 as in the paper, or MSE). Outputs: <output_dir>/rescaled.pt
({"module": state_dict}, what --rescaled_checkpoint_path takes) and the diffusers folder <output_dir>/transformer.
At the end (and with --eval_only) it prints the agreement with the original: relative velocity error per flow
time bucket and the PSNR of same-noise 28-step samples.
"""

import json
from pathlib import Path

import torch

from common.cli import UsageError, nonnegative_float, positive_float, positive_int, probability, run
from model.loading import load_transformer
from model.pipeline import FluxEulerPipeline
from model.rescale import (TIME_COMPONENTS, RescaleConfig, format_report, remap_initialisation, rescale_loss,
                           sample_agreement, velocity_error_by_time)
from training import DistillationMethod, Trainer, training_parser
from training.checkpoint import atomic_torch_save


class Rescale(DistillationMethod):
    name = "rescale"
    tracker_project = "flux_rescale"
    pipeline_cls = FluxEulerPipeline

    def __init__(self, args):
        super().__init__(args)
        self.config = RescaleConfig(
            time_mixture=dict(args.time_mixture),
            guidance_min=args.guidance_min, guidance_max=args.guidance_max, prompt_dropout=args.prompt_dropout,
            loss=args.rescale_loss, smooth_l1_beta=args.smooth_l1_beta,
        )

    def build(self, components, dtype, device):
        args = self.args
        self.neg_cond = components.encode([args.negative_prompt], args.max_sequence_length, device)
        hub = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
        teacher = load_transformer(args.pretrained_model_name_or_path, time_input_scale=1000.0, dtype=dtype, **hub)
        student = load_transformer(args.pretrained_model_name_or_path, weights_path=args.rescaled_checkpoint_path,
                                   time_input_scale=1.0, dtype=torch.float32, **hub)
        if args.init == "remap" and not args.rescaled_checkpoint_path:
            remap_initialisation(student, (args.guidance_min, args.guidance_max))
        if args.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student, teacher

    def loss(self, student, teacher, batch, step, generator, forward=None):
        return rescale_loss(forward if forward is not None else student, teacher, batch.x0, batch.cond,
                            self.neg_cond, batch.img_ids, self.config, generator)


def mixture_component(text: str) -> tuple[str, float]:
    """argparse type of --time_mixture items: "name:weight" with a known name and a weight >= 0."""
    import argparse

    name, _, weight = text.partition(":")
    if name not in TIME_COMPONENTS or not weight:
        raise argparse.ArgumentTypeError(f"{text!r} is not name:weight with a name among {', '.join(TIME_COMPONENTS)}")
    return name, nonnegative_float(weight)


def parse_args(argv=None):
    parser = training_parser(__doc__.splitlines()[0])
    g = parser.add_argument_group("rescaling")
    g.add_argument("--init", choices=["copy", "remap"], default="copy",
                   help="copy: the x1 student starts from the original weights; remap: time/guidance embedder "
                        "inputs re-indexed to x1 frequencies (METHODS 2.2)")
    g.add_argument("--time_mixture", nargs="+", type=mixture_component,
                   default=[("logit_normal", 1.0), ("shifted", 1.0), ("uniform", 1.0)],
                   help="components:weights of the flow-time distribution")
    g.add_argument("--guidance_min", type=nonnegative_float, default=1.0)
    g.add_argument("--guidance_max", type=nonnegative_float, default=6.0,
                   help="guidance ~ U[min, max]; must cover training (4-5) and sampling (3.5-4.5) values")
    g.add_argument("--prompt_dropout", type=probability, default=0.1)
    g.add_argument("--negative_prompt", default="", help="the prompt a dropped caption becomes")
    g.add_argument("--rescale_loss", choices=["smooth_l1", "mse"], default="smooth_l1")
    g.add_argument("--smooth_l1_beta", type=positive_float, default=0.05)
    g.add_argument("--eval_only", action="store_true",
                   help="only report the agreement of --rescaled_checkpoint_path (or of the initialisation)")
    g.add_argument("--eval_batches", type=positive_int, default=2)
    g.add_argument("--eval_steps", type=positive_int, default=28)
    g.add_argument("--eval_guidance", type=nonnegative_float, default=3.5)
    g.add_argument("--eval_prompts", nargs="+", default=["a photo of a cat", "a photo of a red car",
                                                         "a photo of two dogs", "a blue bench left of a tree"])
    args = parser.parse_args(argv)
    if args.guidance_min > args.guidance_max:
        raise UsageError(f"--guidance_min {args.guidance_min} exceeds --guidance_max {args.guidance_max}")
    args.allow_unrescaled_teacher = True  # the student here starts from the x1000 weights on purpose
    return args


@torch.no_grad()
def evaluate(args, student=None) -> dict:
    """Agreement of an x1 transformer (default: --rescaled_checkpoint_path or the initialisation) with the x1000."""
    from data import TextImageDataset, collate_text_image, load_text_image_dataset
    from model.latents import encode_images, image_ids, pack_latents
    from training.trainer import load_components

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    components = load_components(args, device, dtype)
    method = Rescale(args)
    teacher, init_student = method.build(components, dtype, device)[::-1]
    student = (student or init_student).to(device, dtype).eval()
    teacher = teacher.to(device).eval()
    dataset = TextImageDataset(load_text_image_dataset(args.dataset_name, args.dataset_config_name, args.data_files,
                                                       args.dataset_split, args.cache_dir),
                               args.resolution, args.image_column, args.caption_column)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_text_image)
    errors = []
    for i, raw in zip(range(args.eval_batches), loader):
        cond = components.encode(raw["captions"], args.max_sequence_length, device)
        x0 = encode_images(components.vae, raw["pixel_values"], generator=generator)
        rows = velocity_error_by_time(teacher, student, pack_latents(x0).to(device), cond,
                                      image_ids(*x0.shape[-2:], device=device), args.eval_guidance, generator)
        errors.append(rows)
    errors = [(lo, hi, sum(r[k][2] for r in errors) / len(errors)) for k, (lo, hi, _) in enumerate(errors[0])]
    pipes = [components.pipeline(FluxEulerPipeline, model) for model in (teacher, student)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    agreement = sample_agreement(*pipes, args.eval_prompts, args.resolution, args.eval_steps, args.eval_guidance,
                                 args.seed, args.max_sequence_length)
    print(format_report(errors, agreement))
    return {"velocity_error_by_time": errors, **agreement}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.eval_only:
        report = evaluate(args)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rescale_eval.json").write_text(json.dumps(report, indent=1))
        return report
    trainer = Trainer(args, Rescale(args))
    final = trainer.train()
    if not trainer.accelerator.is_main_process:
        return None
    student = load_transformer(str(final), subfolder=None)
    atomic_torch_save({"module": {k: v.detach().cpu() for k, v in student.state_dict().items()}},
                      out / "rescaled.pt")
    args.rescaled_checkpoint_path = None  # the evaluation builds its own teacher from the original weights
    report = evaluate(args, student=student)
    (out / "rescale_eval.json").write_text(json.dumps(report, indent=1))
    print(f"rescaled checkpoint: {out / 'rescaled.pt'} (diffusers folder: {final})")
    return report


if __name__ == "__main__":
    run(main)
