"""The training skeleton every distillation method reuses (sCM, MeanFlow, teacher rescaling, SiD, ...).

A method declares its trained networks and the phases of one iteration (`training.method`); the skeleton does the
rest: accelerate with DeepSpeed ZeRO-2 (one engine per trained network) or DDP (gloo without CUDA), per-rank
random streams, data, text and VAE encoding, one optimizer, LR schedule, clipping and optional EMA per network,
gradient accumulation, non-finite-step guards, logging, validation images, atomic checkpoints with exact resume,
and inference exports.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.cli import UsageError, check_pretrained_model, hub_error, require_writable_dir
from data import PromptDataset, TextImageDataset, build_dataloader, load_text_image_dataset
from model.latents import encode_images, image_ids, pack_latents
from model.loading import check_checkpoint, load_transformer

from .checkpoint import check_resumable, export_transformer, load_checkpoint, resolve_resume, save_checkpoint
from .method import Batch, Components, DistillationMethod, NetworkSpec

logger = logging.getLogger("training")


def rank_seed(seed: int, rank: int) -> int:
    """Independent, reproducible streams per rank (the reference seeds every rank identically, METHODS 8.6)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that several runs can train in one process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _dataset_too_small(items: int, batches: int, batch_size: int, processes: int) -> UsageError:
    return UsageError(f"the dataset ({items} items) is smaller than one step's {batches} batches of {batch_size} per "
                      f"process x {processes} processes; lower --train_batch_size or add data")


def build_accelerator(args: argparse.Namespace, project: str, clipping: dict[str, float] | None = None):
    """The Accelerator; under DeepSpeed one plugin per trained network when their clipping differs
    (`clipping`: {network: max_grad_norm}, in preparation order)."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    from parallel_config import deepspeed_config

    plugins = None
    mixed_precision = args.mixed_precision
    if args.ds_file:
        clipping = clipping or {"student": args.max_grad_norm}
        configs = {name: deepspeed_config(args.ds_file, args.train_batch_size, norm, args.gradient_accumulation_steps)
                   for name, norm in clipping.items()}
        if "RANK" not in os.environ:  # a plain `python train_*.py --ds_file ...`: a one-process group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        config = next(iter(configs.values()))
        plugins = {name: DeepSpeedPlugin(hf_ds_config=c) for name, c in configs.items()}
        if len(set(clipping.values())) == 1:
            plugins = next(iter(plugins.values()))  # one config serves every engine
        ds_precision = "bf16" if config.get("bf16", {}).get("enabled") else (
            "fp16" if config.get("fp16", {}).get("enabled") else "no")
        if mixed_precision not in (None, ds_precision):
            raise UsageError(f"--mixed_precision {mixed_precision} disagrees with {args.ds_file} ({ds_precision}); "
                             "drop the flag or change the config")
        mixed_precision = ds_precision
    elif mixed_precision is None:
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    kwargs_handlers = []
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 or plugins is not None:
        # without CUDA the process group must be gloo (NCCL needs GPUs), also under DeepSpeed
        kwargs_handlers.append(InitProcessGroupKwargs(timeout=timedelta(hours=24),
                                                      backend=None if torch.cuda.is_available() else "gloo"))
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        # on a machine without CUDA, torchrun processes are plain DDP over gloo only with cpu=True
        cpu=not torch.cuda.is_available() and plugins is None,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        deepspeed_plugins=plugins,
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


def require_rescaled(args) -> None:
    """A clear stop when a method that trains x1 models has no --rescaled_checkpoint_path (and no smoke-test flag)."""
    if not args.rescaled_checkpoint_path and not args.allow_unrescaled_teacher:
        raise UsageError(
            "--rescaled_checkpoint_path is required: distillation trains x1 (rescaled time input) models, and "
            "without it the x1 model would start from x1000 weights that are untrained for x1 time inputs. "
            "Make one with train_rescale.py, or pass --allow_unrescaled_teacher for a smoke test."
        )


def load_rescaled(args, dtype, **kwargs):
    """The x1 transformer from --rescaled_checkpoint_path, with a clear stop when it is missing."""
    require_rescaled(args)
    if not args.rescaled_checkpoint_path:
        logger.warning("no --rescaled_checkpoint_path: the x1 models start from x1000-trained weights")
    return load_transformer(args.pretrained_model_name_or_path, weights_path=args.rescaled_checkpoint_path,
                            time_input_scale=1.0, dtype=dtype, revision=args.revision, variant=args.variant,
                            cache_dir=args.cache_dir, **kwargs)


def _make_optimizer(args, spec: NetworkSpec, params):
    lr = spec.learning_rate if spec.learning_rate is not None else args.learning_rate
    betas = spec.betas or (args.adam_beta1, args.adam_beta2)
    weight_decay = spec.weight_decay if spec.weight_decay is not None else args.adam_weight_decay
    eps = spec.epsilon if spec.epsilon is not None else args.adam_epsilon
    if args.optimizer.lower() == "prodigy":
        try:
            import prodigyopt
        except ImportError as err:
            raise UsageError("--optimizer prodigy needs `pip install prodigyopt`") from err
        return prodigyopt.Prodigy(params, lr=lr, betas=betas, beta3=args.prodigy_beta3, weight_decay=weight_decay,
                                  eps=eps, decouple=args.prodigy_decouple,
                                  use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def _save_grid(rows: list[list], captions: list[str], path: Path):
    """One row of images per caption (the validation prompt at one step count), the caption under every image."""
    from common.grids import captioned_grid

    columns = max(len(r) for r in rows)
    tiles = [image for row in rows for image in row]
    grid = captioned_grid(tiles, [c for row, c in zip(rows, captions) for _ in row], columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


class TrainedNetwork:
    """A trained network at run time: the wrapped module, its optimizer, LR schedule and EMA."""

    def __init__(self, name: str, spec: NetworkSpec, accelerator):
        self.name, self.spec, self.accelerator = name, spec, accelerator
        self.wrapped = self.optimizer = self.lr_scheduler = self.ema = None
        self.max_grad_norm = 0.0

    @property
    def plain(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.wrapped)

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type.name == "DEEPSPEED"

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.plain.parameters() if p.requires_grad]


class Networks:
    """What a phase's loss sees of the trained networks."""

    def __init__(self, nets: dict[str, TrainedNetwork]):
        self._nets = nets

    def plain(self, name: str) -> torch.nn.Module:
        return self._nets[name].plain

    def wrapped(self, name: str) -> torch.nn.Module:
        return self._nets[name].wrapped

    def names(self) -> list[str]:
        return list(self._nets)


class Trainer:
    def __init__(self, args: argparse.Namespace, method: DistillationMethod):
        self.args = args
        self.method = method

    # ----- setup -----
    def setup(self):
        args, method = self.args, self.method
        self.check_inputs()
        self.resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
        self.phases = method.phases()
        clipping = getattr(method, "network_clipping", lambda: None)()
        self.accelerator = acc = build_accelerator(args, method.tracker_project, clipping)
        if self.resume_path is not None:
            check_resumable(self.resume_path, acc.num_processes)
        # libraries speak at WARNING (accelerate narrates every file of a checkpoint at INFO); ours at INFO
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
        logger.setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.device = acc.device
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
        self.generator = torch.Generator().manual_seed(rank_seed(args.seed, acc.process_index))
        torch.manual_seed(rank_seed(args.seed, acc.process_index))

        dataset = self.build_dataset()
        loader = build_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, shuffle=True,
                                  seed=args.seed)
        batches_per_step = len(self.phases) * args.gradient_accumulation_steps
        if len(dataset) < batches_per_step * args.train_batch_size * acc.num_processes:  # before the models load
            raise _dataset_too_small(len(dataset), batches_per_step, args.train_batch_size, acc.num_processes)

        self.components = self.load_components()
        specs, teacher = method.build_networks(self.components, self.weight_dtype, self.device)
        if teacher is not None:
            teacher.requires_grad_(False).eval().to(self.device)
        self.teacher = teacher
        if args.scale_lr:
            args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
        self.loader = acc.prepare(loader)
        self.updates_per_epoch = len(self.loader) // batches_per_step
        if self.updates_per_epoch == 0:  # the prepared loader's own count (its sharding can round down)
            raise _dataset_too_small(len(dataset), batches_per_step, args.train_batch_size, acc.num_processes)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * self.updates_per_epoch
        if args.lr_scheduler == "constant" and args.lr_warmup_steps > 0:
            # diffusers' "constant" ignores warmup (so does the reference, METHODS 8.20): honour the request
            logger.info("--lr_scheduler constant with --lr_warmup_steps %d: using constant_with_warmup",
                        args.lr_warmup_steps)
            args.lr_scheduler = "constant_with_warmup"
        self.nets = {name: self.prepare_network(name, spec) for name, spec in specs.items()}
        self.networks = Networks(self.nets)
        for phase in self.phases:
            if phase.network not in self.nets:
                raise ValueError(f"phase trains {phase.network!r}, which {method.name} does not build")
        self.state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "nonfinite_skipped": 0,
                      "num_processes": acc.num_processes, "method": method.name,
                      "effective_max_grad_norm": self._clipping_summary()}
        self._batches = None

    def check_inputs(self) -> None:
        """The user's inputs, checked before anything slow (the 8B model load) so that a mistake costs seconds."""
        check_pretrained_model(self.args.pretrained_model_name_or_path)
        require_writable_dir(self.args.output_dir, "--output_dir")
        if self.method.needs_rescaled:
            require_rescaled(self.args)
        for flag in ("rescaled_checkpoint_path", "resume_path"):
            if getattr(self.args, flag, None):
                check_checkpoint(getattr(self.args, flag))

    def load_components(self) -> Components:
        """The frozen text encoders, VAE and scheduler (another world, such as the exact one, brings its own)."""
        return load_components(self.args, self.device, self.weight_dtype)

    def build_dataset(self):
        args = self.args
        if not self.method.needs_images:
            return PromptDataset.from_args(args)
        dataset = load_text_image_dataset(args.dataset_name, args.dataset_config_name, args.data_files,
                                          args.dataset_split, args.cache_dir)
        return TextImageDataset(dataset, args.resolution, args.image_column, args.caption_column,
                                args.max_train_samples)

    def prepare_network(self, name: str, spec: NetworkSpec) -> TrainedNetwork:
        from diffusers.optimization import get_scheduler

        args, acc = self.args, self.accelerator
        net = TrainedNetwork(name, spec, acc)
        spec.module.train().to(self.device)
        params = [p for p in spec.module.parameters() if p.requires_grad]
        for hook in spec.grad_hooks:
            for p in params:
                p.register_hook(hook)
        optimizer = _make_optimizer(args, spec, params)
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=args.lr_warmup_steps * acc.num_processes,
                                     num_training_steps=args.max_train_steps * acc.num_processes,
                                     num_cycles=args.lr_num_cycles, power=args.lr_power)
        if getattr(acc.state, "deepspeed_plugins", None) and isinstance(acc.state.deepspeed_plugins, dict) \
                and len(acc.state.deepspeed_plugins) > 1:
            acc.state.select_deepspeed_plugin(name)
        net.wrapped, net.optimizer, net.lr_scheduler = acc.prepare(spec.module, optimizer, lr_scheduler)
        if net.deepspeed:
            net.max_grad_norm = float(net.wrapped.gradient_clipping())
        else:
            net.max_grad_norm = spec.max_grad_norm if spec.max_grad_norm is not None else args.max_grad_norm
        if spec.ema_decay:
            from diffusers.training_utils import EMAModel

            net.ema = EMAModel(net.plain.parameters(), decay=spec.ema_decay)
            net.ema.to(self.device)
            acc.register_for_checkpointing(net.ema)
        return net

    def _clipping_summary(self):
        values = {name: net.max_grad_norm for name, net in self.nets.items()}
        return values["student"] if list(values) == ["student"] else values

    # ----- data -----
    def next_batch(self):
        """The next raw batch of this process, continuing into the next epoch (its own shuffle) as needed."""
        state = self.state
        while True:
            if self._batches is None:
                self.loader.set_epoch(state["epoch"])
                skip = state["batches_in_epoch"]
                self._batches = iter(self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader)
            try:
                raw = next(self._batches)
            except StopIteration:
                state["epoch"] += 1
                state["batches_in_epoch"] = 0
                self._batches = None
                continue
            state["batches_in_epoch"] += 1
            return raw

    @torch.no_grad()
    def encode_batch(self, raw, images: bool = True) -> Batch:
        """Prompt embeddings and, when `images` and the batch has them, the images' packed VAE latents (x0)."""
        args = self.args
        cond = self.components.encode(raw["captions"], args.max_sequence_length, self.device)
        if "pixel_values" in raw and images:
            x0 = encode_images(self.components.vae, raw["pixel_values"], generator=self.generator)
            h, w = x0.shape[-2:]
            x0 = pack_latents(x0).to(self.device)
        else:  # prompts only, or a phase that reads no image: the latent size follows the images / --resolution
            factor = 2 ** (len(self.components.vae.config.block_out_channels) - 1)
            size = raw["pixel_values"].shape[-2:] if "pixel_values" in raw else (args.resolution, args.resolution)
            x0, h, w = None, size[0] // factor, size[1] // factor
        return Batch(x0, cond, image_ids(h, w, device=self.device), raw["captions"], (h, w))

    # ----- one step -----
    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _backward(self, net: TrainedNetwork, loss: torch.Tensor, last: bool) -> None:
        if net.deepspeed:  # one engine per network: drive it directly (accelerator.backward knows only the first)
            net.wrapped.set_gradient_accumulation_boundary(last)
            net.wrapped.backward(loss)
            return
        self.accelerator.backward(loss)  # divides by the accumulation steps

    @contextmanager
    def _phase_context(self, phase, net: TrainedNetwork, last: bool):
        """Around one micro-batch's loss and backward: DDP's no_sync before the last micro-batch (it must cover the
        forward too), and the phase's other trained networks frozen (their inputs still carry gradients), so that
        nothing accumulates into them and checkpointed blocks recompute exactly as they ran."""
        frozen = [p for name in phase.frozen for p in self.nets[name].parameters()]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with net.wrapped.no_sync() if not last and hasattr(net.wrapped, "no_sync") else nullcontext():
                yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def run_phase(self, phase) -> dict | None:
        """One update of `phase.network` over --gradient_accumulation_steps batches; None if it was skipped."""
        acc, args, net = self.accelerator, self.args, self.nets[phase.network]
        steps = args.gradient_accumulation_steps
        bad, backpropped, logs = False, 0, {}
        for micro in range(steps):
            last = micro == steps - 1
            batch = self.encode_batch(self.next_batch(), images=phase.images)
            with self._phase_context(phase, net, last):
                with acc.autocast():
                    loss, micro_logs = phase.loss(self.networks, self.teacher, batch, self.state["global_step"],
                                                  self.generator)
                if self._any_rank(not torch.isfinite(loss).item()):
                    bad = True
                elif not bad:
                    self._backward(net, loss, last)
                    backpropped += 1
            for k, v in {"loss": loss, **micro_logs}.items():
                logs[k] = logs.get(k, 0.0) + torch.as_tensor(v).detach().float() / steps
        grad_norm = None
        if net.deepspeed:
            if backpropped and bad and backpropped < steps:
                # DeepSpeed owns the accumulated gradients: close the accumulation with a zero-gradient boundary
                # pass, then let the finite micro-batches update (the step is only skipped when none was finite)
                net.wrapped.set_gradient_accumulation_boundary(True)
                net.wrapped.backward(sum(p.sum() for p in net.parameters()) * 0.0)
            if backpropped:
                net.wrapped.step()
                grad_norm = net.wrapped.get_global_grad_norm()
        elif not bad and net.max_grad_norm and net.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(net.wrapped.parameters(), net.max_grad_norm)
            bad = not math.isfinite(float(grad_norm))
        if bad and not (net.deepspeed and backpropped):
            net.optimizer.zero_grad(set_to_none=True)
            return None
        if not net.deepspeed:
            net.optimizer.step()
            net.optimizer.zero_grad(set_to_none=True)
        net.lr_scheduler.step()
        if net.ema is not None:
            net.ema.step(net.plain.parameters())
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(float(grad_norm))
        logs["lr"] = torch.tensor(net.lr_scheduler.get_last_lr()[0])
        return None if bad else logs

    def train_step(self) -> tuple[dict, bool]:
        """One iteration: every active phase in order. Returns (logs, whether any phase was skipped)."""
        logs, skipped = {}, False
        single = len(self.nets) == 1
        for phase in self.phases:
            if phase.active is not None and not phase.active(self.state["global_step"]):
                continue
            phase_logs = self.run_phase(phase)
            if phase_logs is None:
                skipped = True
                continue
            for k, v in phase_logs.items():
                logs[k if single or k not in ("loss", "grad_norm", "lr") else f"{phase.network}_{k}"] = v
        return logs, skipped

    # ----- checkpoints, exports, validation -----
    @property
    def export_net(self) -> TrainedNetwork:
        return self.nets[self.method.export_network]

    def exported_transformer(self):
        return self.method.export_transformer(self.export_net.plain)

    def _with_ema(self, fn):
        net = self.export_net
        if net.ema is None:
            return fn()
        params = list(net.plain.parameters())
        net.ema.store(params)
        net.ema.copy_to(params)
        try:
            return fn()
        finally:
            net.ema.restore(params)

    def export(self, folder: Path, step: int) -> None:
        if self.accelerator.is_main_process:
            pt = Path(self.args.output_dir) / "ckpts" / f"transformer_{step}.pt"
            meta = self.method.export_metadata()
            self._with_ema(lambda: export_transformer(self.exported_transformer(), folder / "transformer", pt, meta))

    def save(self) -> Path:
        step = self.state["global_step"]
        if getattr(self, "_clock", None) is not None:  # training wall time over every launch, up to this checkpoint
            self.state["train_seconds"] = self._seconds_before + time.perf_counter() - self._clock
        rank_state = {"generator": self.generator.get_state(), "method": self.method.rank_state()}
        path = save_checkpoint(self.accelerator, Path(self.args.output_dir), step, self.state, rank_state,
                               lambda tmp: self.export(tmp, step), self.args.checkpoints_total_limit)
        logger.info("saved %s", path)
        return path

    def resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        trainer_state, rank_state = load_checkpoint(self.accelerator, path)
        self.state.update(trainer_state)
        self.generator.set_state(rank_state["generator"])
        self.method.load_rank_state(rank_state.get("method", {}))
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
            if hasattr(self.method, "configure_pipeline"):
                self.method.configure_pipeline(pipe)
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
        captions = [f"{n} step{'s' if n > 1 else ''}: {args.validation_prompt}" for n in args.validation_inference_steps]
        grid = _save_grid(rows, captions, Path(args.output_dir) / "validation" / f"step_{step:07d}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid, caption=f"rows: {args.validation_inference_steps} steps")},
                            step=step)

    # ----- main loop -----
    def log(self, logs: dict, step: int) -> dict:
        reduced = {k: self.accelerator.reduce(torch.as_tensor(v).to(self.device).float().reshape(1),
                                              reduction="mean").item()
                   for k, v in sorted(logs.items())}
        self.accelerator.log(reduced, step=step)
        return reduced

    def train(self) -> Path:
        self.setup()
        self.resume()
        acc, args, state = self.accelerator, self.args, self.state
        logger.info("training %s: %d steps, %d per epoch, batch %d x %d processes x %d accumulation, networks %s",
                    self.method.name, args.max_train_steps, self.updates_per_epoch, args.train_batch_size,
                    acc.num_processes, args.gradient_accumulation_steps, ", ".join(self.nets))
        bar = self._progress_bar()
        first_step, last_shown = state["global_step"], {}
        consecutive_bad = 0
        images_per_step = args.train_batch_size * acc.num_processes * args.gradient_accumulation_steps
        started = self._clock = time.perf_counter()
        self._seconds_before = state.get("train_seconds", 0.0)
        while state["global_step"] < args.max_train_steps:
            tick = time.perf_counter()
            logs, skipped = self.train_step()
            state["global_step"] += 1
            step = state["global_step"]
            bar.update(min(time.perf_counter() - started, bar.total) - bar.n if args.max_train_minutes else 1)
            if skipped:
                state["nonfinite_skipped"] += 1
                consecutive_bad += 1
                acc.log({"nonfinite_skipped": state["nonfinite_skipped"]}, step=step)
                logger.warning("step %d: non-finite loss or gradient, update skipped (%d in all)", step,
                               state["nonfinite_skipped"])
                if consecutive_bad >= args.max_nonfinite_steps:
                    path = self.save()
                    raise FloatingPointError(
                        f"{consecutive_bad} consecutive non-finite steps: stopping (state saved in {path}); "
                        "lower --learning_rate or check the data and the rescaled checkpoint")
            else:
                consecutive_bad = 0
            if logs and step % args.log_every == 0:
                elapsed = time.perf_counter() - tick
                logs.update(step_time=torch.tensor(elapsed), images_per_sec=torch.tensor(images_per_step / elapsed))
                shown = self.log(logs, step)
                last_shown = {k: shown[k] for k in shown if k == "loss" or k.endswith("_loss")}
                bar.set_postfix({**({"step": step} if args.max_train_minutes else {}),
                                 **{k: f"{v:.4g}" for k, v in last_shown.items()}, "s/step": f"{elapsed:.2f}"})
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                self.save()
            if args.validation_prompt and args.validation_steps and step % args.validation_steps == 0:
                self.validate()
            if args.max_train_minutes and self._any_rank(time.perf_counter() - started >= 60 * args.max_train_minutes):
                logger.info("--max_train_minutes %g reached at step %d", args.max_train_minutes, step)
                break
        bar.close()
        final = self.finish()
        if acc.is_main_process:
            minutes = (time.perf_counter() - started) / 60
            done = state["global_step"] - first_step
            losses = ", ".join(f"{k} {v:.4g}" for k, v in last_shown.items())
            tqdm.write(f"{self.method.name} done: {done} steps in {minutes:.1f} min ({60 * minutes / max(done, 1):.2f} s/step"
                       f"{', step ' + str(state['global_step']) + ' in all' if first_step else ''})"
                       f"{'; last ' + losses if losses else ''}; exported to {final}")
        acc.end_training()
        return final

    def _progress_bar(self):
        """A tqdm bar in steps, or in seconds under --max_train_minutes (the step count is then in its postfix)."""
        args, acc = self.args, self.accelerator
        off = not acc.is_local_main_process
        if args.max_train_minutes:
            return tqdm(total=round(60 * args.max_train_minutes), disable=off, unit="s",
                        desc=f"{self.method.name} ({args.max_train_minutes:g} min)",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        return tqdm(total=args.max_train_steps, initial=self.state["global_step"], disable=off,
                    desc=self.method.name, unit="step")

    def finish(self) -> Path:
        """Final checkpoint (unless just written) and the final export in <output_dir>/transformer."""
        out = Path(self.args.output_dir)
        step = self.state["global_step"]
        if not (out / f"checkpoint-{step}").exists():
            self.save()
        if self.accelerator.is_main_process:
            self.state["train_seconds"] = self._seconds_before + time.perf_counter() - self._clock
            meta = self.method.export_metadata()
            self._with_ema(lambda: export_transformer(self.exported_transformer(), out / "transformer", None, meta))
            (out / "training_summary.json").write_text(json.dumps(self.state, indent=1))
        self.accelerator.wait_for_everyone()
        return out / "transformer"
