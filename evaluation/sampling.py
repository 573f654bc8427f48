"""Command-line plumbing shared by the GenEval sampling scripts (test_flux8b.py, test_sCM.py, test_meanflow.py)."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import torch

from common.cli import (ArgumentParser, UsageError, check_pretrained_model, nonnegative_float, nonnegative_int,
                        positive_int, require_file, require_writable_dir, resolution)

from .geneval import Shard, generate_geneval, load_prompts, run_dir

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sampling_parser(description: str, default_steps: int, default_guidance: float = 3.5) -> argparse.ArgumentParser:
    """The reference's test-script flags, plus batching, prompt selection and precision."""
    p = ArgumentParser(description=description)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="FLUX pipeline folder or hub id (text encoders, VAE, scheduler and transformer config)")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--resolution", type=resolution, default=512)
    p.add_argument("--num_inference_steps", type=positive_int, default=default_steps)
    p.add_argument("--guidance_scale", type=nonnegative_float, default=default_guidance,
                   help="the value fed to FLUX's guidance embedding (>= 0)")
    p.add_argument("--seed", type=nonnegative_int, default=42,
                   help="every image's noise is derived from (seed, prompt, image)")
    p.add_argument("--max_sequence_length", type=positive_int, default=256)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--prompts_file", default=None, help="one prompt per line (default: the GenEval prompts)")
    p.add_argument("--metadata_file", default=None, help="GenEval-format metadata .jsonl (default: GenEval's)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts (quick runs)")
    p.add_argument("--images_per_prompt", type=positive_int, default=4)
    p.add_argument("--batch_size", type=positive_int, default=4, help="prompts per pipeline call")
    p.add_argument("--transformer_batch_size", type=positive_int, default=None,
                   help="images per transformer call (default: --images_per_prompt, which makes every image "
                        "bitwise independent of --batch_size and of the number of processes)")
    p.add_argument("--mixed_precision", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--ds_file", default=None, help="accepted for compatibility with the reference; not needed")
    return p


def add_student_args(parser: argparse.ArgumentParser) -> None:
    """--resume_path (the student) and --global_step, and several step counts per run for students."""
    parser.add_argument("--resume_path", required=True,
                        help="the student: a .pt holding {'module': state_dict} (ours or the reference's released "
                             "students), a .safetensors file, or a diffusers transformer folder")
    parser.add_argument("--global_step", type=nonnegative_int, default=None,
                        help="training step for the output folder name (default: parsed from --resume_path)")
    for action in parser._actions:
        if action.dest == "num_inference_steps":
            action.nargs = "+"
            action.help = "one or more step counts, e.g. 1 2 4 (one GenEval folder each)"


def check_sampling_args(args: argparse.Namespace) -> argparse.Namespace:
    """The paths a sampling run needs exist, before any model is loaded (one-line errors otherwise)."""
    check_pretrained_model(args.pretrained_model_name_or_path)
    if args.prompts_file and args.metadata_file:
        raise UsageError("pass either --prompts_file or --metadata_file, not both")
    for flag in ("prompts_file", "metadata_file"):
        if getattr(args, flag):
            require_file(getattr(args, flag), f"--{flag}")
    for flag in ("resume_path", "rescaled_checkpoint_path"):
        value = getattr(args, flag, None)
        if value and not Path(value).exists():
            raise UsageError(f"--{flag} {value} does not exist; pass a .pt holding {{'module': state_dict}}, a "
                             ".safetensors file or a diffusers transformer folder")
        if value:
            from model.loading import check_checkpoint

            check_checkpoint(value)  # unreadable, pickled or malformed: refused before the model is loaded
    load_prompts(args.prompts_file, args.metadata_file, args.limit)  # an empty or malformed file: refused here
    require_writable_dir(args.output_dir, "--output_dir")
    return args


def global_step_of(path: str | os.PathLike) -> int:
    """The step in transformer_<k>.pt or checkpoint-<k>/..., else 0 (the reference parses the file name too)."""
    for part in reversed(Path(path).parts):
        match = re.fullmatch(r"(?:transformer_|checkpoint-)(\d+)(?:\.pt|\.safetensors)?", part)
        if match:
            return int(match.group(1))
    return 0


def device_and_dtype(mixed_precision: str | None) -> tuple[torch.device, torch.dtype]:
    """This process's device (cuda:LOCAL_RANK under torchrun when CUDA exists, else CPU) and weight dtype."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    default = "bf16" if device.type == "cuda" else "no"
    return device, DTYPES[mixed_precision or default]


def run_geneval(args: argparse.Namespace, pipeline, global_step: int = 0, extra_config: dict | None = None,
                num_inference_steps: int | None = None):
    """Sample the selected prompts into the GenEval layout with `pipeline`; returns the run folder."""
    steps = num_inference_steps or args.num_inference_steps
    if args.ds_file:
        logger.warning("--ds_file is ignored: sampling needs no DeepSpeed engine")
    prompts = load_prompts(args.prompts_file, args.metadata_file, args.limit)
    run = run_dir(args.output_dir, args.resolution, steps, args.guidance_scale, global_step)
    pipeline.set_progress_bar_config(disable=True)
    n = args.images_per_prompt

    def generate(texts, generators):
        return pipeline(
            prompt=texts,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            num_images_per_prompt=n,
            generator=generators,
            max_sequence_length=args.max_sequence_length,
            transformer_batch_size=args.transformer_batch_size or n,
        ).images

    config = {
        "pipeline": type(pipeline).__name__,
        "resolution": args.resolution,
        "num_inference_steps": steps,
        "guidance_scale": args.guidance_scale,
        "max_sequence_length": args.max_sequence_length,
        **(extra_config or {}),
    }
    shard = Shard.from_env()
    written, skipped = generate_geneval(generate, prompts, run, n, args.batch_size, args.seed, shard, config)
    print(f"[rank {shard.rank}] wrote {written} prompt folders, skipped {skipped} finished ones, in {run}")
    return run


def run_student_geneval(args: argparse.Namespace, pipeline) -> list:
    """Every requested step count of a student into its own GenEval folder."""
    step = args.global_step if args.global_step is not None else global_step_of(args.resume_path)
    return [run_geneval(args, pipeline, step, {"resume_path": str(args.resume_path)}, n)
            for n in args.num_inference_steps]


def student_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of test_sCM.py / test_meanflow.py."""
    parser = sampling_parser(doc.splitlines()[0], default_steps=[4])
    add_student_args(parser)
    return parser


def student_main(doc: str, pipeline_name: str, argv=None, **load_kwargs) -> list:
    """The whole of test_sCM.py / test_meanflow.py: parse, load the x1 student from --resume_path, sample.

    `pipeline_name` names a class of model.pipeline; the model stack is imported after the flags are checked.
    """
    args = check_sampling_args(student_parser(doc).parse_args(argv))
    import model.pipeline
    from model.loading import load_transformer

    pipeline_cls = getattr(model.pipeline, pipeline_name)
    device, dtype = device_and_dtype(args.mixed_precision)
    hub = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    transformer = load_transformer(args.pretrained_model_name_or_path, weights_path=args.resume_path,
                                   time_input_scale=1.0, dtype=dtype, **load_kwargs, **hub)
    pipeline = pipeline_cls.from_pretrained(args.pretrained_model_name_or_path, transformer=transformer, dtype=dtype,
                                            **hub).to(device)
    return run_student_geneval(args, pipeline)
