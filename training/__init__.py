"""The shared training skeleton: flags, the accelerate/DeepSpeed loop, checkpoints and exports."""

from .args import str2bool, training_parser
from .method import Batch, Components, DistillationMethod, NetworkSpec, Phase
from .trainer import Trainer, load_rescaled, rank_seed, reset_accelerate

__all__ = ["Batch", "Components", "DistillationMethod", "NetworkSpec", "Phase", "Trainer", "load_rescaled",
           "rank_seed", "reset_accelerate", "str2bool", "training_parser"]
