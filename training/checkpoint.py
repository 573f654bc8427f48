"""Training checkpoints: atomic, complete, pruned, resumable; plus inference exports of the student.

`<output_dir>/checkpoint-<step>/` holds accelerate's state (model, optimizer, LR scheduler, EMA, RNG), each
rank's own random stream, and `trainer_state.json` (step, epoch, position in the epoch, counters). It is
written under a temporary name and renamed when complete, so a run killed mid-write leaves the previous
checkpoint intact. Exports: `checkpoint-<step>/transformer/` (diffusers folder, safetensors) and the
reference's `ckpts/transformer_<step>.pt` holding {"module": state_dict}.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from common.cli import MissingPathError, UsageError

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first (temporary, unfinished folders are ignored)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for path in out.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / TRAINER_STATE).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike, value: str | None) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint` names ("latest" may find none: start fresh)."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch", output_dir)
            return None
        return found[-1][1]
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / value
    if not (path / TRAINER_STATE).exists():
        available = [p.name for _, p in list_checkpoints(output_dir)]
        raise MissingPathError(f"--resume_from_checkpoint {value}: {path} is not a complete checkpoint folder; pass "
                               f"'latest' or one of {available or 'the checkpoint-<step> folders of a run'}")
    return path


def check_resumable(path: Path, num_processes: int) -> dict:
    """The checkpoint's trainer state, if this run can continue it exactly (same number of processes)."""
    try:
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path / TRAINER_STATE} cannot be read ({err}); resume from another checkpoint") from err
    if trainer_state.get("num_processes") != num_processes:
        raise UsageError(f"{path} was written by {trainer_state.get('num_processes')} processes; resume with the "
                         f"same number (now {num_processes}) to continue exactly")
    return trainer_state


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict, rank_state: dict,
                    export_fn=None, total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically on every rank's behalf; `export_fn(folder)` adds inference exports."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    atomic_torch_save(rank_state, tmp / f"rank_state_{accelerator.process_index}.pt")
    if export_fn is not None:
        export_fn(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_STATE, json.dumps({**trainer_state, "global_step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    """Keep the newest `total_limit` checkpoints (and their ckpts/transformer_<step>.pt exports)."""
    if not total_limit:
        return
    found = list_checkpoints(output_dir)
    for step, path in found[:-total_limit]:
        shutil.rmtree(path)
        pt = Path(output_dir) / "ckpts" / f"transformer_{step}.pt"
        if pt.exists():
            pt.unlink()
        logger.info("removed old checkpoint %s", path)


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict]:
    """Restore accelerate's state; returns (trainer_state, this rank's rank_state)."""
    accelerator.load_state(str(path))
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    rank_file = path / f"rank_state_{accelerator.process_index}.pt"
    if not rank_file.exists():
        raise MissingPathError(
            f"{rank_file} is missing: the checkpoint was written by a run with fewer processes; resume with "
            f"the same number of processes ({trainer_state.get('num_processes')})"
        )
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    return trainer_state, rank_state


EXPORT_METADATA = "sampling.json"


def export_transformer(transformer, folder: Path, pt_path: Path | None = None, metadata: dict | None = None) -> None:
    """Save an inference copy: a diffusers folder (safetensors) and optionally the reference's .pt format.

    `metadata` (sampling settings such as SiD's generator schedule) goes to `<folder>/sampling.json` and under
    the .pt's "sampling" key (plain numbers and strings, so weights_only loading reads it).
    """
    transformer.save_pretrained(folder, safe_serialization=True)
    if metadata:
        atomic_write_text(Path(folder) / EXPORT_METADATA, json.dumps(metadata, indent=1))
    if pt_path is not None:
        state_dict = {k: v.detach().cpu().clone() for k, v in transformer.state_dict().items()}
        atomic_torch_save({"module": state_dict, **({"sampling": metadata} if metadata else {})}, pt_path)


def read_export_metadata(path: str | os.PathLike) -> dict:
    """The sampling settings saved with an export (a transformer folder, its parent, or a .pt); {} if none."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / EXPORT_METADATA, path / "transformer" / EXPORT_METADATA):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        return {}
    if path.suffix in (".pt", ".pth", ".bin") and path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # reads only what is used
        except Exception:  # read_state_dict reports unreadable files
            return {}
        return obj.get("sampling", {}) if isinstance(obj, dict) else {}
    return {}
