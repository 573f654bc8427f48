"""Training in the exact world through the project's own skeleton and loss code.

    python -m exactworld.train --method fit --output_dir outputs/exact/fit --max_train_steps 3000
    python -m exactworld.train --method scm --init outputs/exact/fit/transformer --output_dir outputs/exact/scm \\
        --max_train_steps 2000 [any flag of train_sCM.py]

`ExactTrainer` is `training.Trainer` with the world's data (x0 drawn from the mixture by the trainer's own random
stream, so resume stays exact) and one-hot prompt "encoders" in place of a FLUX pipeline's VAE and text encoders.
The methods are the entry scripts' own classes (`train_sCM.SCM`, `train_meanflow.MeanFlow`, `train_sid.SiD`) with
only their networks swapped: the closed-form `ExactTeacher` for the teacher, and copies of a fitted
`ExactWorldNet` (the world's "x1 twin", made by `--method fit`: regression onto the exact guided velocity) for
the students, MeanFlow's with its dual-time embedder, SiD's generator and fake score. Their losses, phases,
optimisers, schedules, clipping, EMA, checkpoints and exports are the ones a FLUX run uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the entry scripts (train_sCM.py, ...) live at the repository root
    sys.path.insert(0, str(ROOT))

from common.cli import (UsageError, nonnegative_float, positive_int, probability, require_writable_dir,  # noqa: E402
                        run)
from data import PromptDataset  # noqa: E402
from model.latents import image_ids  # noqa: E402
from training import Batch, DistillationMethod, Trainer, reset_accelerate, training_parser  # noqa: E402

from .networks import ExactTeacher, ExactWorldNet  # noqa: E402
from .world import GaussianMixtureWorld, WorldConfig  # noqa: E402

METHODS = ("fit", "scm", "meanflow", "sid")
PROMPT_REPEATS = 64  # an epoch holds every prompt this many times (shuffled)


class ExactComponents:
    """The frozen "encoders" of the exact world: prompts to one-hot embeddings."""

    def __init__(self, world: GaussianMixtureWorld):
        self.world = world

    def encode(self, prompts: list[str], max_sequence_length: int, device) -> object:
        return self.world.encode(list(prompts), device=device)


class ExactTrainer(Trainer):
    """The shared training skeleton, fed by the exact world instead of a FLUX pipeline and image data."""

    def __init__(self, args: argparse.Namespace, method: DistillationMethod, world: GaussianMixtureWorld):
        super().__init__(args, method)
        self.world = world

    def check_inputs(self) -> None:
        require_writable_dir(self.args.output_dir, "--output_dir")

    def load_components(self) -> ExactComponents:
        return ExactComponents(self.world)

    def build_dataset(self):
        return PromptDataset(self.world.prompts * PROMPT_REPEATS, "the exact world's prompts")

    @torch.no_grad()
    def encode_batch(self, raw, images: bool = True) -> Batch:
        captions = raw["captions"]
        ids = self.world.prompt_ids(captions)
        x0, _ = self.world.sample(ids, self.generator)
        tokens = self.world.config.num_tokens
        h, w = 2, 2 * tokens  # a latent grid whose 2x2 packing gives `tokens` tokens
        return Batch(x0.to(self.device), self.world.encode(captions, device=self.device),
                     image_ids(h, w, device=self.device), captions, (h, w))


# ----- the methods: the entry scripts' classes with the exact world's networks -----
class ExactNetworks:
    """What every exact-world method adds to its base class: the world, and where its students start from."""

    pipeline_cls = None  # no image pipeline: the benchmark scores samples with the world's metrics

    def attach(self, world: GaussianMixtureWorld, init: str | None):
        self.world, self.init = world, init
        return self

    def load_init(self) -> ExactWorldNet:
        if not self.init:
            raise UsageError(f"--method {self.name} starts from a fitted velocity network: pass --init "
                             "<fit run>/transformer (make one with --method fit)")
        if not (Path(self.init) / "config.json").is_file():
            raise UsageError(f"--init {self.init} is not an ExactWorldNet folder (no config.json); pass the "
                             "transformer/ folder of a --method fit run")
        return ExactWorldNet.from_pretrained(self.init).float()


class VelocityFit(ExactNetworks, DistillationMethod):
    """The world's "twin": an ExactWorldNet regressed onto the exact guided velocity, E||v_theta - v_T||^2 at
    x_t = (1 - t) x0 + t eps with t ~ U(0, 1), the prompt replaced by "" with probability --cfg_prob."""

    name = "fit"
    tracker_project = "exact_world"

    def build(self, components, dtype, device):
        self.empty = components.encode([""], 0, device)
        c, a = self.world.config, self.args
        student = (self.load_init() if self.init else
                   ExactWorldNet(num_tokens=c.num_tokens, in_channels=c.channels, text_dim=c.num_prompts + 1,
                                 width=a.width, depth=a.depth))
        return student, ExactTeacher(self.world)

    def loss(self, student, teacher, batch, step, generator, forward=None):
        from model.transformer import flux_velocity

        x0 = batch.x0
        B = len(x0)
        t = torch.rand(B, generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        drop = torch.rand(B, generator=generator) < self.args.cfg_prob
        cond = batch.cond.where(drop, self.empty)
        g = torch.full((B,), self.world.config.guidance, device=x0.device)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        with torch.no_grad():
            v_T = flux_velocity(teacher, x_t, t, g, cond, batch.img_ids)
        v = flux_velocity(forward or student, x_t, t, g, cond, batch.img_ids)
        loss = (v - v_T).square().mean()
        return loss, {"loss_fit": loss.detach()}


def _method_classes():
    from train_meanflow import NEGATIVE_PROMPT, MeanFlow
    from train_sCM import SCM
    from train_sid import SiD

    from model.scm import TrigFlowModel

    class ExactSCM(ExactNetworks, SCM):
        def build(self, components, dtype, device):
            student = TrigFlowModel(self.load_init(), logvar_head=True,
                                    generator=torch.Generator().manual_seed(self.args.seed))
            return student, TrigFlowModel(ExactTeacher(self.world))

    class ExactMeanFlow(ExactNetworks, MeanFlow):
        def build(self, components, dtype, device):
            self.neg_cond = components.encode([NEGATIVE_PROMPT], self.args.max_sequence_length, device)
            student = self.load_init()
            student.add_dual_timestep_embedder(zero_init_last=self.args.zero_init_dual)
            return student, ExactTeacher(self.world)

    class ExactSiD(ExactNetworks, SiD):
        def load_network(self, dtype=torch.float32):
            return self.load_init()

        def load_teacher(self, dtype):
            return ExactTeacher(self.world)

    return {"scm": ExactSCM, "meanflow": ExactMeanFlow, "sid": ExactSiD}


# ----- command line -----
def _fit_parse_args(argv):
    parser = training_parser("Fit an ExactWorldNet to the exact world's guided velocity (the students' start)")
    g = parser.add_argument_group("fit")
    g.add_argument("--cfg_prob", type=probability, default=0.1, help="share of prompts replaced by the empty prompt")
    g.add_argument("--width", type=int, default=256)
    g.add_argument("--depth", type=int, default=4)
    return parser.parse_args(argv)


def parse_args(argv=None) -> tuple[str, argparse.Namespace, WorldConfig, str | None]:
    """(method, the method's own parsed flags, world config, --init) from `--method M [--init DIR] [--world_*] ...`."""
    head = argparse.ArgumentParser(add_help=False)
    head.add_argument("--method", choices=METHODS, required=True)
    head.add_argument("--init", default=None, help="the fitted ExactWorldNet folder the students start from")
    head.add_argument("--world_seed", type=int, default=WorldConfig.seed)
    head.add_argument("--world_guidance", type=nonnegative_float, default=WorldConfig.guidance)
    head.add_argument("--world_prompts", type=positive_int, default=WorldConfig.num_prompts)
    head.add_argument("--world_modes_per_prompt", type=positive_int, default=WorldConfig.modes_per_prompt)
    known, rest = head.parse_known_args(argv)
    world = WorldConfig(seed=known.world_seed, guidance=known.world_guidance, num_prompts=known.world_prompts,
                        modes_per_prompt=known.world_modes_per_prompt)
    rest = ["--pretrained_model_name_or_path", "exact-world", "--report_to", "none", "--dataloader_num_workers", "0",
            "--resolution", "16", *rest]
    if known.method == "fit":
        return known.method, _fit_parse_args(rest), world, known.init
    module = {"scm": "train_sCM", "meanflow": "train_meanflow", "sid": "train_sid"}[known.method]
    if known.method == "sid" and "--prompts_file" not in rest:
        rest += ["--prompts_file", str(write_prompts_file(world, rest))]
    return known.method, __import__(module).parse_args(rest + ["--allow_unrescaled_teacher"]), world, known.init


def write_prompts_file(world: WorldConfig, argv: list[str]) -> Path:
    """SiD is data-free and reads its prompts from a file: the world's prompts, in the run's output folder."""
    out = Path(argv[argv.index("--output_dir") + 1]) if "--output_dir" in argv else Path("flux-dyn")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prompts.txt"
    path.write_text("\n".join(GaussianMixtureWorld(world).prompts) + "\n")
    return path


def build_method(method: str, args: argparse.Namespace, world: GaussianMixtureWorld, init: str | None):
    cls = VelocityFit if method == "fit" else _method_classes()[method]
    return cls(args).attach(world, init)


def train(argv=None) -> Path:
    """Train one exact-world model; returns its export folder (<output_dir>/transformer)."""
    method, args, world_config, init = parse_args(argv)
    world = GaussianMixtureWorld(world_config)
    reset_accelerate()
    try:
        return ExactTrainer(args, build_method(method, args, world, init), world).train()
    finally:
        reset_accelerate()


if __name__ == "__main__":
    run(train)
