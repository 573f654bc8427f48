"""Command-line flags shared by every training script (the reference's names and defaults, METHODS 6.5)."""

from __future__ import annotations

import argparse

from common.cli import (ArgumentParser, decay, nonnegative_float, nonnegative_int, positive_float, positive_int,
                        resolution, str2bool)
from data import add_dataset_args

__all__ = ["LR_SCHEDULERS", "str2bool", "training_parser"]

LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def training_parser(description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="FLUX pipeline folder or hub id (e.g. Freepik/flux.1-lite-8B)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--rescaled_checkpoint_path", default=None,
                   help="the rescaled (x1 time input) teacher: .pt {'module': state_dict}, .safetensors or folder")
    g.add_argument("--allow_unrescaled_teacher", action="store_true",
                   help="train without --rescaled_checkpoint_path: the x1 model then starts from x1000 weights, "
                        "which are untrained for x1 time inputs (only sensible for tests and smoke runs)")
    g.add_argument("--max_sequence_length", type=positive_int, default=256)

    g = p.add_argument_group("data")
    g.add_argument("--resolution", type=resolution, default=512)
    g.add_argument("--dataloader_num_workers", type=nonnegative_int, default=1)
    add_dataset_args(p)

    g = p.add_argument_group("output and logging")
    g.add_argument("--output_dir", default="flux-dyn")
    g.add_argument("--logging_dir", default="tensorboard_logs", help="relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"])
    g.add_argument("--tracker_project_name", default=None)
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--num_validation_images", type=positive_int, default=4)
    g.add_argument("--validation_steps", type=positive_int, default=500)
    g.add_argument("--validation_inference_steps", type=positive_int, nargs="+", default=[1, 2, 4])
    g.add_argument("--validation_guidance_scale", type=nonnegative_float, default=3.5)
    g.add_argument("--log_every", type=positive_int, default=1, help="log scalars every N optimizer steps")

    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seeds every rank's own random stream (seed, rank)")
    g.add_argument("--train_batch_size", type=positive_int, default=4, help="per device")
    g.add_argument("--num_train_epochs", type=positive_int, default=1)
    g.add_argument("--max_train_steps", type=positive_int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--max_train_minutes", type=positive_float, default=None,
                   help="also stop (with the final checkpoint and export) after this much training time of this launch")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--max_grad_norm", type=nonnegative_float, default=1.0, help="0 disables clipping")
    g.add_argument("--learning_rate", type=positive_float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS,
                   help="a diffusers get_scheduler name; constant honours --lr_warmup_steps")
    g.add_argument("--lr_warmup_steps", type=nonnegative_int, default=500)
    g.add_argument("--lr_num_cycles", type=positive_int, default=1)
    g.add_argument("--lr_power", type=positive_float, default=1.0)
    g.add_argument("--optimizer", default="AdamW", choices=["AdamW", "adamw", "prodigy"])
    g.add_argument("--adam_beta1", type=decay, default=0.9)
    g.add_argument("--adam_beta2", type=decay, default=0.999)
    g.add_argument("--adam_weight_decay", type=nonnegative_float, default=1e-4)
    g.add_argument("--adam_epsilon", type=positive_float, default=1e-8)
    g.add_argument("--prodigy_beta3", type=decay, default=None)
    g.add_argument("--prodigy_decouple", type=str2bool, default=True)
    g.add_argument("--prodigy_use_bias_correction", type=str2bool, default=True)
    g.add_argument("--prodigy_safeguard_warmup", type=str2bool, default=True)
    g.add_argument("--ema_decay", type=decay, default=None, help="keep an EMA of the student (e.g. 0.999)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 with --ds_file or on GPU, else no")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--max_nonfinite_steps", type=positive_int, default=20,
                   help="stop (with a checkpoint) after this many consecutive non-finite losses")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=nonnegative_int, default=500, help="0: only at the end")
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-<step> folder')

    g = p.add_argument_group("distribution")
    g.add_argument("--ds_file", default=None, help="DeepSpeed config, e.g. parallel_config/deepspeed_bf16_batch8.json")
    g.add_argument("--local_rank", type=int, default=-1, help="set by launchers; ignored")
    return p
