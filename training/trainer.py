"""The training skeleton every distillation method reuses (sCM, MeanFlow, teacher rescaling, ...).

A method supplies its models and its loss (`DistillationMethod`); the skeleton does the rest: accelerate with
DeepSpeed ZeRO-2 or DDP (gloo without CUDA), per-rank random streams, data, text and VAE encoding, the
optimizer and LR schedule, clipping, EMA, non-finite-step guards, logging, validation images, atomic
checkpoints with exact resume, and inference exports.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.cli import UnwritablePathError, UsageError, check_pretrained_model, hub_error
from data import TextImageDataset, build_dataloader, load_text_image_dataset
from model.latents import encode_images, image_ids, pack_latents
from model.loading import load_transformer
from model.text import PromptEmbeds, encode_prompts

from .checkpoint import check_resumable, export_transformer, load_checkpoint, resolve_resume, save_checkpoint

logger = logging.getLogger("training")


@dataclass
class Batch:
    """One training batch, encoded: packed normalised latents [B, L, 64] (fp32), text conditioning, ids."""

    x0: torch.Tensor
    cond: PromptEmbeds
    img_ids: torch.Tensor
    captions: list[str]
    latent_size: tuple[int, int]


@dataclass
class Components:
    """The frozen parts of the FLUX pipeline: tokenizers, text encoders, VAE and scheduler."""

    tokenizer: object
    text_encoder: torch.nn.Module
    tokenizer_2: object
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object

    def encode(self, prompts: list[str], max_sequence_length: int, device) -> PromptEmbeds:
        return encode_prompts(prompts, self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                              max_sequence_length, device)

    def pipeline(self, cls, transformer):
        return cls(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                   text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, transformer=transformer)


class DistillationMethod:
    """What a method defines. The skeleton calls these; everything else is shared."""

    name = "method"
    tracker_project = "flux_distill"
    pipeline_cls = None  # a model.pipeline class used for validation images

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def build(self, components: Components, dtype: torch.dtype, device) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(student: trainable module the engine wraps, teacher: frozen module or None)."""
        raise NotImplementedError

    def loss(self, student, teacher, batch: Batch, step: int, generator: torch.Generator, forward=None):
        """(scalar loss, {name: scalar tensor}) for one batch.

        `student` is the plain module (for no-grad passes such as JVPs); `forward` is the engine-wrapped
        (DDP/DeepSpeed) module, to be used for the forward whose gradients are trained.
        """
        raise NotImplementedError

    def export_transformer(self, student: torch.nn.Module):
        """The FluxTransformer to export for inference from the (unwrapped) student."""
        return student


def rank_seed(seed: int, rank: int) -> int:
    """Independent, reproducible streams per rank (the reference seeds every rank identically, METHODS 8.6)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UnwritablePathError(f"--output_dir {output_dir} is not writable ({err.strerror}); choose another "
                                  "folder") from err


def build_accelerator(args: argparse.Namespace, project: str):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    from parallel_config import deepspeed_config

    plugin = None
    mixed_precision = args.mixed_precision
    if args.ds_file:
        config = deepspeed_config(args.ds_file, args.train_batch_size, args.max_grad_norm,
                                  args.gradient_accumulation_steps)
        if "RANK" not in os.environ:  # a plain `python train_*.py --ds_file ...`: a one-process group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        plugin = DeepSpeedPlugin(hf_ds_config=config)
        ds_precision = "bf16" if config.get("bf16", {}).get("enabled") else (
            "fp16" if config.get("fp16", {}).get("enabled") else "no")
        if mixed_precision not in (None, ds_precision):
            raise UsageError(f"--mixed_precision {mixed_precision} disagrees with {args.ds_file} ({ds_precision}); "
                             "drop the flag or change the config")
        mixed_precision = ds_precision
    elif mixed_precision is None:
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    kwargs_handlers = []
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 or plugin is not None:
        # without CUDA the process group must be gloo (NCCL needs GPUs), also under DeepSpeed
        kwargs_handlers.append(InitProcessGroupKwargs(timeout=timedelta(hours=24),
                                                      backend=None if torch.cuda.is_available() else "gloo"))
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        # on a machine without CUDA, torchrun processes are plain DDP over gloo only with cpu=True
        cpu=not torch.cuda.is_available() and plugin is None,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        deepspeed_plugin=plugin,
        kwargs_handlers=kwargs_handlers,
    )
    if report_to:
        accelerator.init_trackers(args.tracker_project_name or project, config=_tracker_config(args))
    return accelerator


def _tracker_config(args) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


def load_components(args, device, dtype) -> Components:
    from diffusers import FluxPipeline

    try:
        pipe = FluxPipeline.from_pretrained(args.pretrained_model_name_or_path, transformer=None,
                                            revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
                                            dtype=dtype)
    except OSError as err:
        raise hub_error(args.pretrained_model_name_or_path, err) from err
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.requires_grad_(False).eval().to(device)
    pipe.vae.enable_slicing()
    return Components(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.vae,
                      pipe.scheduler)


def load_rescaled(args, dtype, **kwargs):
    """The x1 transformer from --rescaled_checkpoint_path, with a clear stop when it is missing."""
    if not args.rescaled_checkpoint_path and not args.allow_unrescaled_teacher:
        raise UsageError(
            "--rescaled_checkpoint_path is required: distillation trains x1 (rescaled time input) models, and "
            "without it the x1 model would start from x1000 weights that are untrained for x1 time inputs. "
            "Make one with train_rescale.py, or pass --allow_unrescaled_teacher for a smoke test."
        )
    if not args.rescaled_checkpoint_path:
        logger.warning("no --rescaled_checkpoint_path: the x1 models start from x1000-trained weights")
    return load_transformer(args.pretrained_model_name_or_path, weights_path=args.rescaled_checkpoint_path,
                            time_input_scale=1.0, dtype=dtype, revision=args.revision, variant=args.variant,
                            cache_dir=args.cache_dir, **kwargs)


def _make_optimizer(args, params):
    if args.optimizer.lower() == "prodigy":
        try:
            import prodigyopt
        except ImportError as err:
            raise UsageError("--optimizer prodigy needs `pip install prodigyopt`") from err
        return prodigyopt.Prodigy(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  beta3=args.prodigy_beta3, weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon, decouple=args.prodigy_decouple,
                                  use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup)
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def _save_grid(rows: list[list], path: Path):
    from PIL import Image

    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image, (j * w, i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


class Trainer:
    def __init__(self, args: argparse.Namespace, method: DistillationMethod):
        self.args = args
        self.method = method

    # ----- setup -----
    def setup(self):
        args = self.args
        # the user's inputs are checked before anything slow (the 8B model load) so that a mistake costs seconds
        check_pretrained_model(args.pretrained_model_name_or_path)
        _check_output_dir(Path(args.output_dir))
        self.resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
        self.accelerator = acc = build_accelerator(args, self.method.tracker_project)
        if self.resume_path is not None:
            check_resumable(self.resume_path, acc.num_processes)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            level=logging.INFO if acc.is_main_process else logging.WARNING)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.device = acc.device
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
        self.generator = torch.Generator().manual_seed(rank_seed(args.seed, acc.process_index))
        torch.manual_seed(rank_seed(args.seed, acc.process_index))

        dataset = load_text_image_dataset(args.dataset_name, args.dataset_config_name, args.data_files,
                                          args.dataset_split, args.cache_dir)
        dataset = TextImageDataset(dataset, args.resolution, args.image_column, args.caption_column,
                                   args.max_train_samples)
        loader = build_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, shuffle=True,
                                  seed=args.seed)

        self.components = load_components(args, self.device, self.weight_dtype)
        student, teacher = self.method.build(self.components, self.weight_dtype, self.device)
        if teacher is not None:
            teacher.requires_grad_(False).eval().to(self.device)
        student.train().to(self.device)
        self.teacher = teacher
        if args.scale_lr:
            args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = _make_optimizer(args, params)

        from diffusers.optimization import get_scheduler

        updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps / acc.num_processes)
        if updates_per_epoch == 0:
            raise UsageError(f"the dataset ({len(dataset)} items) is smaller than one batch per process; lower "
                             "--train_batch_size or add data")
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * updates_per_epoch
        if args.lr_scheduler == "constant" and args.lr_warmup_steps > 0:
            # diffusers' "constant" ignores warmup (so does the reference, METHODS 8.20): honour the request
            logger.info("--lr_scheduler constant with --lr_warmup_steps %d: using constant_with_warmup",
                        args.lr_warmup_steps)
            args.lr_scheduler = "constant_with_warmup"
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=args.lr_warmup_steps * acc.num_processes,
                                     num_training_steps=args.max_train_steps * acc.num_processes,
                                     num_cycles=args.lr_num_cycles, power=args.lr_power)
        self.student, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(student, optimizer, loader,
                                                                                   lr_scheduler)
        self.ema = None
        if args.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(acc.unwrap_model(self.student).parameters(), decay=args.ema_decay)
            self.ema.to(self.device)
            acc.register_for_checkpointing(self.ema)
        self.updates_per_epoch = updates_per_epoch
        clip = self.student.gradient_clipping() if acc.distributed_type.name == "DEEPSPEED" else args.max_grad_norm
        self.state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "nonfinite_skipped": 0,
                      "num_processes": acc.num_processes, "method": self.method.name,
                      "effective_max_grad_norm": clip}

    # ----- one step -----
    @torch.no_grad()
    def encode_batch(self, raw) -> Batch:
        args = self.args
        cond = self.components.encode(raw["captions"], args.max_sequence_length, self.device)
        x0 = encode_images(self.components.vae, raw["pixel_values"], generator=self.generator)
        h, w = x0.shape[-2:]
        return Batch(pack_latents(x0).to(self.device), cond, image_ids(h, w, device=self.device), raw["captions"],
                     (h, w))

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def train_step(self, raw) -> dict | None:
        """One optimizer step (over gradient-accumulation micro-batches); None if it was skipped."""
        acc, args = self.accelerator, self.args
        batch = self.encode_batch(raw)
        with acc.accumulate(self.student):
            with acc.autocast():
                loss, logs = self.method.loss(acc.unwrap_model(self.student), self.teacher, batch,
                                              self.state["global_step"], self.generator, forward=self.student)
            bad = self._any_rank(not torch.isfinite(loss).item())
            if not bad:
                acc.backward(loss)
            grad_norm = None
            if acc.sync_gradients and not bad:
                if acc.distributed_type.name == "DEEPSPEED":
                    grad_norm = self.student.get_global_grad_norm()
                elif args.max_grad_norm and args.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.student.parameters(), args.max_grad_norm)
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    bad = True
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                return None
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and acc.sync_gradients:
            self.ema.step(acc.unwrap_model(self.student).parameters())
        out = {"loss": loss.detach().float(), **{k: torch.as_tensor(v).detach().float() for k, v in logs.items()}}
        if grad_norm is not None:
            out["grad_norm"] = torch.as_tensor(float(grad_norm))
        return out

    # ----- checkpoints, exports, validation -----
    def exported_transformer(self):
        return self.method.export_transformer(self.accelerator.unwrap_model(self.student))

    def _with_ema(self, fn):
        if self.ema is None:
            return fn()
        params = list(self.accelerator.unwrap_model(self.student).parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            return fn()
        finally:
            self.ema.restore(params)

    def export(self, folder: Path, step: int) -> None:
        if self.accelerator.is_main_process:
            pt = Path(self.args.output_dir) / "ckpts" / f"transformer_{step}.pt"
            self._with_ema(lambda: export_transformer(self.exported_transformer(), folder / "transformer", pt))

    def save(self) -> Path:
        step = self.state["global_step"]
        path = save_checkpoint(self.accelerator, Path(self.args.output_dir), step, self.state,
                               {"generator": self.generator.get_state()}, lambda tmp: self.export(tmp, step),
                               self.args.checkpoints_total_limit)
        logger.info("saved %s", path)
        return path

    def resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        trainer_state, rank_state = load_checkpoint(self.accelerator, path)
        self.state.update(trainer_state)
        self.generator.set_state(rank_state["generator"])
        logger.info("resumed from %s at step %d", path, self.state["global_step"])

    @torch.no_grad()
    def validate(self) -> None:
        args = self.args
        if not args.validation_prompt or not self.accelerator.is_main_process or self.method.pipeline_cls is None:
            return

        def run():
            transformer = self.exported_transformer()
            was_training = transformer.training
            transformer.eval()
            pipe = self.components.pipeline(self.method.pipeline_cls, transformer)
            pipe.set_progress_bar_config(disable=True)
            rows = []
            for steps in args.validation_inference_steps:
                gens = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_validation_images)]
                rows.append(pipe(prompt=args.validation_prompt, height=args.resolution, width=args.resolution,
                                 num_inference_steps=steps, guidance_scale=args.validation_guidance_scale,
                                 num_images_per_prompt=args.num_validation_images, generator=gens,
                                 max_sequence_length=args.max_sequence_length).images)
            transformer.train(was_training)
            return rows

        rows = self._with_ema(run)
        step = self.state["global_step"]
        grid = _save_grid(rows, Path(args.output_dir) / "validation" / f"step_{step:07d}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid, caption=f"rows: {args.validation_inference_steps} steps")},
                            step=step)

    # ----- main loop -----
    def log(self, logs: dict, step: int) -> dict:
        reduced = {k: self.accelerator.reduce(v.to(self.device).reshape(1), reduction="mean").item()
                   for k, v in sorted(logs.items())}
        self.accelerator.log(reduced, step=step)
        return reduced

    def train(self) -> Path:
        self.setup()
        self.resume()
        acc, args, state = self.accelerator, self.args, self.state
        logger.info("training %s: %d steps, %d per epoch, batch %d x %d processes x %d accumulation",
                    self.method.name, args.max_train_steps, self.updates_per_epoch, args.train_batch_size,
                    acc.num_processes, args.gradient_accumulation_steps)
        bar = tqdm(total=args.max_train_steps, initial=state["global_step"], disable=not acc.is_local_main_process,
                   desc=self.method.name)
        consecutive_bad = 0
        images_per_step = args.train_batch_size * acc.num_processes * args.gradient_accumulation_steps
        while state["global_step"] < args.max_train_steps:
            self.loader.set_epoch(state["epoch"])
            loader = acc.skip_first_batches(self.loader, state["batches_in_epoch"]) if state["batches_in_epoch"] \
                else self.loader
            tick = time.perf_counter()
            for raw in loader:
                state["batches_in_epoch"] += 1
                logs = self.train_step(raw)
                if not acc.sync_gradients:
                    continue
                state["global_step"] += 1
                bar.update(1)
                if logs is None:
                    state["nonfinite_skipped"] += 1
                    consecutive_bad += 1
                    acc.log({"nonfinite_skipped": state["nonfinite_skipped"]}, step=state["global_step"])
                    logger.warning("step %d: non-finite loss or gradient, step skipped (%d in all)",
                                   state["global_step"], state["nonfinite_skipped"])
                    if consecutive_bad >= args.max_nonfinite_steps:
                        path = self.save()
                        raise FloatingPointError(
                            f"{consecutive_bad} consecutive non-finite steps: stopping (state saved in {path}); "
                            "lower --learning_rate or check the data and the rescaled checkpoint")
                else:
                    consecutive_bad = 0
                    elapsed = time.perf_counter() - tick
                    if state["global_step"] % args.log_every == 0:
                        logs.update(lr=torch.tensor(self.lr_scheduler.get_last_lr()[0]),
                                    step_time=torch.tensor(elapsed), images_per_sec=torch.tensor(images_per_step / elapsed))
                        shown = self.log(logs, state["global_step"])
                        bar.set_postfix(loss=f"{shown['loss']:.4g}")
                tick = time.perf_counter()
                step = state["global_step"]
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    self.save()
                if args.validation_prompt and args.validation_steps and step % args.validation_steps == 0:
                    self.validate()
                if step >= args.max_train_steps:
                    break
            else:
                state["epoch"] += 1
                state["batches_in_epoch"] = 0
        bar.close()
        final = self.finish()
        acc.end_training()
        return final

    def finish(self) -> Path:
        """Final checkpoint (unless just written) and the final export in <output_dir>/transformer."""
        out = Path(self.args.output_dir)
        step = self.state["global_step"]
        if not (out / f"checkpoint-{step}").exists():
            self.save()
        if self.accelerator.is_main_process:
            self._with_ema(lambda: export_transformer(self.exported_transformer(), out / "transformer"))
            (out / "training_summary.json").write_text(json.dumps(self.state, indent=1))
        self.accelerator.wait_for_everyone()
        return out / "transformer"
