"""The toy world's ceiling: the students' own architecture taught by plain regression on the teacher's ODE.

Knowledge distillation on ODE pairs: the teacher's 28-step Euler solution is computed for (caption, noise) pairs
of the training captions, and a dual-timestep x1 student (MeanFlow's architecture, from the same x1 twin) learns by
mean squared error the average velocity of each segment its 1-, 2- and 4-step MeanFlow sampler takes,

    u(x_t, r, t) = (x_t - x_r) / (t - r),   x_t, x_r on the teacher's trajectory from the same noise,

so at 1 step it regresses (noise -> the teacher's 28-step output) directly. The answer is handed to it, so its
scores are what this student can represent in 1, 2 and 4 steps with this budget (docs/toy_world.md).

    python -m toyworld.ceiling pairs --teacher_dir DIR --data_files train.parquet --output pairs.safetensors
    python -m toyworld.ceiling train --pretrained_model_name_or_path DIR --rescaled_checkpoint_path X1 \\
        --pairs pairs.safetensors --output_dir out [train_*.py flags]

Sampling the result: `test_meanflow.py` / FluxMeanFlowPipeline, like any MeanFlow student.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.cli import MissingPathError, UsageError, nonnegative_float, positive_int, run  # noqa: E402
from model.conventions import flux_times  # noqa: E402
from model.latents import image_ids  # noqa: E402
from model.meanflow import average_velocity  # noqa: E402
from model.pipeline import FluxMeanFlowPipeline  # noqa: E402
from training import Batch, DistillationMethod, Trainer, load_rescaled, training_parser  # noqa: E402

SAMPLER_NFES = (1, 2, 4)  # the MeanFlow sampler step counts whose segments the student learns
TEACHER_STEPS = 28


def sampler_times(image_seq_len: int, scheduler_config: dict | None, nfes=SAMPLER_NFES) -> list[list[float]]:
    """The MeanFlow sampler's time grids [t_0 = 1, ..., 0] for each step count (FLUX's shifted schedule)."""
    return [flux_times(n, image_seq_len, scheduler_config).tolist() for n in nfes]


def segment_times(grids: list[list[float]]) -> tuple[list[float], list[tuple[int, int]]]:
    """(the distinct times of all grids, descending; the segments (i, j) as indices into them, t_i > t_j)."""
    times = sorted({round(t, 7) for grid in grids for t in grid}, reverse=True)
    index = {t: i for i, t in enumerate(times)}
    segments = sorted({(index[round(a, 7)], index[round(b, 7)]) for grid in grids for a, b in zip(grid, grid[1:])})
    return times, segments


@torch.no_grad()
def teacher_trajectory(velocity, noise: torch.Tensor, grid: torch.Tensor, times: list[float]) -> torch.Tensor:
    """Points of the teacher's Euler polyline on `grid` (t_0 = 1 ... 0) at `times`: [B, len(times), L, C].

    Euler is exactly linear within a step, so x(tau) = z_j + (tau - t_j) v_j for t_j >= tau >= t_{j+1}."""
    z = noise.float()
    out: dict[int, torch.Tensor] = {}
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        v = velocity(z, torch.tensor(t))
        for k, tau in enumerate(times):
            if k not in out and t >= tau >= t_next:
                out[k] = z + (tau - t) * v
        z = z + (t_next - t) * v
    for k, tau in enumerate(times):
        out.setdefault(k, z)  # tau = 0
    return torch.stack([out[k] for k in range(len(times))], dim=1)


def _built_setting(teacher_dir: str, key: str, default):
    """A toy teacher's build setting (its toy_teacher.json), or `default` for another pipeline folder."""
    summary = Path(teacher_dir) / "toy_teacher.json"
    return json.loads(summary.read_text())["config"][key] if summary.exists() else default


@torch.no_grad()
def make_pairs(teacher_dir: str, captions: list[str], output: Path, per_caption: int = 2, guidance: float = 3.5,
               seed: int = 0, batch_size: int = 64, log=print, resolution: int | None = None,
               max_sequence_length: int | None = None) -> Path:
    """The teacher's trajectories for `per_caption` noises of every caption, saved (safetensors, written atomically)
    with their captions and times (a few minutes on 2 cores for the toy benchmark's 12000)."""
    from safetensors.torch import save_file

    from model.loading import load_transformer
    from model.pipeline import FluxEulerPipeline
    from model.text import encode_prompts

    pipe = FluxEulerPipeline.from_pretrained(teacher_dir, transformer=load_transformer(teacher_dir))
    pipe.set_progress_bar_config(disable=True)
    max_len = max_sequence_length or _built_setting(teacher_dir, "max_sequence_length", 256)
    resolution = resolution or _built_setting(teacher_dir, "resolution", 64)
    h = w = resolution // 8
    tokens = (h // 2) * (w // 2)
    times, _ = segment_times(sampler_times(tokens, pipe.scheduler.config))
    grid = flux_times(TEACHER_STEPS, tokens, pipe.scheduler.config)
    items = [c for c in captions for _ in range(per_caption)]
    gen = torch.Generator().manual_seed(seed)
    trajectories = []
    for start in range(0, len(items), batch_size):
        part = items[start:start + batch_size]
        cond = encode_prompts(part, pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, max_len)
        kwargs = {"encoder_hidden_states": cond.prompt_embeds, "pooled_projections": cond.pooled_prompt_embeds,
                  "txt_ids": cond.text_ids, "img_ids": image_ids(h, w)}
        g = torch.full((len(part),), guidance)
        noise = torch.randn(len(part), tokens, 64, generator=gen)
        trajectories.append(teacher_trajectory(lambda z, t: pipe.predict(z, t, g, kwargs), noise, grid, times))
        if log and (start // batch_size) % 20 == 0:
            log(f"teacher trajectories: {start + len(part)} / {len(items)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    save_file({"trajectories": torch.cat(trajectories).contiguous(), "times": torch.tensor(times)}, str(tmp),
              metadata={"captions": json.dumps(items), "guidance": str(guidance), "teacher_steps": str(TEACHER_STEPS)})
    tmp.replace(output)
    return output


class TrajectoryDataset(torch.utils.data.Dataset):
    """(caption, trajectory [T, L, C]) items of a pairs file."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingPathError(f"--pairs {path} does not exist; make it with `python -m toyworld.ceiling pairs`")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            self.trajectories = f.get_tensor("trajectories")
            self.times = f.get_tensor("times")
        self.captions = json.loads(meta["captions"])
        self.guidance = float(meta["guidance"])

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"caption": self.captions[index], "num_skipped": 0, "trajectory": self.trajectories[index]}


class ODERegression(DistillationMethod):
    """Mean squared error of u_theta(x_t, r, t) against the teacher trajectory's segment velocity; one segment per
    sample, drawn uniformly from the 1-, 2- and 4-step samplers' segments."""
    needs_rescaled = True

    name = "KD"
    tracker_project = "toy_ceiling"
    pipeline_cls = FluxMeanFlowPipeline

    def build(self, components, dtype, device):
        student = load_rescaled(self.args, torch.float32, dual_timestep=True, zero_init_dual=True)
        if self.args.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student, None

    def loss(self, student, teacher, batch, step, generator, forward=None):
        traj, times = batch.trajectory, batch.times.to(batch.trajectory.device)
        segments = self.segments
        pick = torch.randint(len(segments), (len(traj),), generator=generator)
        i = torch.tensor([segments[k][0] for k in pick])
        j = torch.tensor([segments[k][1] for k in pick])
        rows = torch.arange(len(traj))
        x_t, x_r, t, r = traj[rows, i], traj[rows, j], times[i], times[j]
        u_tgt = (x_t - x_r) / (t - r)[:, None, None]
        g = torch.full((len(traj),), self.guidance, device=traj.device)
        u = average_velocity(forward or student, x_t, r, t, g, batch.cond, batch.img_ids)
        loss = (u - u_tgt).square().mean()
        return loss, {"loss_kd": loss.detach(), "t_minus_r": (t - r).mean()}


class CeilingTrainer(Trainer):
    """The shared skeleton on a pairs file: captions are encoded as in every run, trajectories replace the VAE."""

    def build_dataset(self):
        dataset = TrajectoryDataset(self.args.pairs)
        self.method.guidance = dataset.guidance
        self.times = dataset.times
        tokens = dataset.trajectories.shape[2]
        grids = sampler_times(tokens, None)
        times, self.method.segments = segment_times(grids)
        if not torch.allclose(torch.tensor(times), dataset.times, atol=1e-6):
            raise UsageError(f"--pairs {self.args.pairs} holds times {dataset.times.tolist()}, not this sampler's "
                             f"{times}; remake it")
        return dataset

    @torch.no_grad()
    def encode_batch(self, raw, images: bool = True) -> Batch:
        cond = self.components.encode(raw["captions"], self.args.max_sequence_length, self.device)
        traj = raw["trajectory"].to(self.device).float()
        side = int(round(traj.shape[2] ** 0.5)) * 2
        batch = Batch(None, cond, image_ids(side, side, device=self.device), raw["captions"], (side, side))
        batch.trajectory, batch.times = traj, self.times
        return batch


def parse_args(argv=None):
    parser = training_parser("Ceiling student: regression on the teacher's ODE trajectories (toy world)")
    parser.add_argument("--pairs", required=True, help="the teacher's trajectories (python -m toyworld.ceiling pairs)")
    return parser.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pairs":
        p = argparse.ArgumentParser(description="the teacher's ODE trajectories for the ceiling student")
        p.add_argument("--teacher_dir", required=True)
        p.add_argument("--data_files", required=True, help="a toy training set (parquet) whose captions are used")
        p.add_argument("--output", required=True)
        p.add_argument("--per_caption", type=positive_int, default=2)
        p.add_argument("--guidance_scale", type=nonnegative_float, default=3.5)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--caption_column", default="llava")
        a = p.parse_args(argv[1:])
        import pyarrow.parquet as pq

        captions = pq.read_table(a.data_files, columns=[a.caption_column]).column(a.caption_column).to_pylist()
        return make_pairs(a.teacher_dir, captions, Path(a.output), a.per_caption, a.guidance_scale, a.seed)
    if argv and argv[0] == "train":
        argv = argv[1:]
    args = parse_args(argv)
    return CeilingTrainer(args, ODERegression(args)).train()


if __name__ == "__main__":
    run(main)
