"""The shared training skeleton: flags, the accelerate/DeepSpeed loop, checkpoints and exports."""

from .args import str2bool, training_parser
from .trainer import Batch, Components, DistillationMethod, Trainer, load_rescaled, rank_seed

__all__ = ["Batch", "Components", "DistillationMethod", "Trainer", "load_rescaled", "rank_seed", "str2bool",
           "training_parser"]
