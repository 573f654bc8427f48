"""DeepSpeed configurations (ZeRO-2, bf16) for micro-batches of 1, 4, 8 and 16, and the function that reads them.

The JSON files leave `gradient_clipping` and `gradient_accumulation_steps` as "auto"; `deepspeed_config`
fills them from the command line, so `--max_grad_norm` is what DeepSpeed clips with. (The reference leaves
"auto" to accelerate, which silently turns it into 1.0 while its scripts ask for 0.1.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.cli import MissingPathError, UsageError

CONFIG_DIR = Path(__file__).resolve().parent


def default_config_path(micro_batch_size: int) -> Path:
    return CONFIG_DIR / f"deepspeed_bf16_batch{micro_batch_size}.json"


def _agree(config: dict, key: str, value, flag: str, path) -> None:
    current = config.get(key, "auto")
    if current != "auto" and float(current) != float(value):
        raise UsageError(f"{path} sets {key}={current} but {flag} is {value}; make them agree (or set \"auto\")")


def deepspeed_config(
    path: str | os.PathLike,
    train_batch_size: int,
    max_grad_norm: float,
    gradient_accumulation_steps: int = 1,
) -> dict:
    """The DeepSpeed config of `path` with clipping and accumulation taken from the command line.

    A micro-batch, clipping or accumulation value in the file that disagrees with the command line is an error.
    """
    path = Path(path)
    if not path.exists():
        shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.json")))
        raise MissingPathError(f"--ds_file {path} does not exist; shipped configs in {CONFIG_DIR}: {shipped}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--ds_file {path} is not a JSON DeepSpeed config ({err})") from err
    if not isinstance(config, dict):
        raise UsageError(f"--ds_file {path} is not a JSON object (a DeepSpeed config)")
    micro = config.get("train_micro_batch_size_per_gpu", "auto")
    if micro != "auto" and int(micro) != train_batch_size:
        raise UsageError(
            f"{path} sets train_micro_batch_size_per_gpu={micro} but --train_batch_size is {train_batch_size}; "
            + (f"use {default_config_path(train_batch_size)}" if default_config_path(train_batch_size).exists()
               else "pass a config whose micro-batch matches (or set it to \"auto\")")
        )
    _agree(config, "gradient_clipping", max_grad_norm, "--max_grad_norm", path)
    _agree(config, "gradient_accumulation_steps", gradient_accumulation_steps, "--gradient_accumulation_steps", path)
    config["train_micro_batch_size_per_gpu"] = train_batch_size
    config["gradient_clipping"] = max_grad_norm
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    return config
