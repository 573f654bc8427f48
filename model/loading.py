"""Loading transformer weights strictly: diffusers folders, safetensors files, and the reference's `.pt`.

The reference loads its rescaled checkpoint non-strictly, so any key missing from the file silently
keeps the original x1000-trained weight (METHODS 8.2). Here a mismatch is an error listing the keys; the only
allowance is MeanFlow's second time embedder, which is created as a copy of the first when absent.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file

from common.cli import MissingPathError, UsageError, hub_error, one_line

from .transformer import DUAL_TIMESTEP_KEYS, FluxTransformer

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointMismatchError(UsageError):
    """A state dict whose keys do not match the model it is loaded into."""


@contextmanager
def hub_errors(name: str, flag: str = "--pretrained_model_name_or_path"):
    """Turn "cannot find or fetch this model" errors of diffusers / huggingface_hub into one-line UsageErrors."""
    from huggingface_hub.errors import HFValidationError

    try:
        yield
    except (OSError, HFValidationError) as err:
        raise hub_error(name, err, flag) from err


def _safetensors_files(path: Path) -> list[Path]:
    """The .safetensors file itself, or those of a folder (of its transformer/ subfolder when it has one)."""
    if not path.is_dir():
        return [path]
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingPathError(f"no .safetensors weights in {folder}; export the model with save_pretrained")
    return files


def check_checkpoint(path: str | os.PathLike) -> None:
    """read_state_dict's checks without reading the tensors (safetensors headers; torch.load memory-mapped), so
    that an unreadable, pickled or malformed checkpoint is refused before any model is loaded."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        from safetensors import safe_open

        if not path.exists():
            raise MissingPathError(f"checkpoint {path} does not exist")
        for file in _safetensors_files(path):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except Exception as err:
                raise UsageError(f"{file} is not a readable .safetensors file ({one_line(err)[:200]}); pass a "
                                 ".safetensors file, a diffusers transformer folder or a .pt") from err
        return
    read_state_dict(path, mmap=True)


def read_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, a folder of them, or a .pt/.pth/.bin file (read with weights_only=True;
    memory-mapped with `mmap`, so that only what is touched is read).

    A dict holding the state dict under "module" (the reference's checkpoints) is unwrapped, and so is a
    "module." prefix on every key (a state dict saved from a DDP/DeepSpeed wrapper).
    """
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"checkpoint {path} does not exist")
    if path.is_dir() or path.suffix == ".safetensors":
        state_dict = {}
        for file in _safetensors_files(path):
            state_dict.update(load_file(file))
    elif path.suffix in PICKLE_SUFFIXES:
        fix = "pass a .pt holding {'module': state_dict}, a .safetensors file or a diffusers transformer folder"
        if not zipfile.is_zipfile(path) and path.read_bytes()[:1] != b"\x80":  # torch.save: zip, or legacy pickle
            raise UsageError(f"{path} is not a file written by torch.save (it starts with {path.read_bytes()[:16]!r}); "
                             + fix)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
        except pickle.UnpicklingError as err:  # pickle of arbitrary objects is refused on purpose
            raise UsageError(f"{path} holds pickled Python objects besides tensors, which are not loaded (code could "
                             f"run); {fix}") from err
        except Exception as err:
            first = one_line(str(err).strip().splitlines()[0] if str(err).strip() else "")
            raise UsageError(f"{path} cannot be read with torch.load ({type(err).__name__}: {first[:200]}); "
                             f"{fix}") from err
        state_dict = obj.get("module", obj) if isinstance(obj, dict) else obj
    else:
        raise UsageError(f"unknown checkpoint type {path.suffix!r} for {path}: use .safetensors, .pt or a folder")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise UsageError(f"{path} holds no state dict (top-level keys: {keys}); expected {{'module': state_dict}}")
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_strict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    allow_missing: tuple[str, ...] = (),
    source: str = "checkpoint",
    assign: bool = False,
) -> list[str]:
    """Load every key or fail listing the differences; keys starting with an `allow_missing` prefix may be absent.

    Returns the allowed keys that were missing (the caller initialises them).
    """
    expected = set(model.state_dict())
    given = set(state_dict)
    missing = sorted(expected - given)
    allowed = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    missing = [k for k in missing if k not in allowed]
    unexpected = sorted(given - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        raise CheckpointMismatchError(
            f"{source} does not match {type(model).__name__}: "
            + (f"missing keys: {show(missing)}; " if missing else "")
            + (f"unexpected keys: {show(unexpected)}; " if unexpected else "")
            + "is it a checkpoint of this model configuration (FLUX variant, dual-timestep or not)?"
        )
    shapes = [k for k in given if state_dict[k].shape != model.state_dict()[k].shape]
    if shapes:
        raise CheckpointMismatchError(f"{source}: shape mismatch for {shapes[:8]}; wrong model size?")
    current = model.state_dict()
    if assign:
        state_dict = with_own_storage(state_dict)
    model.load_state_dict({**{k: current[k] for k in allowed}, **state_dict}, strict=True, assign=assign)
    return allowed


def with_own_storage(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, except that any tensor sharing its storage with an earlier one is a copy.

    `torch.save` keeps shared storage, and `load_state_dict(assign=True)` keeps the loaded tensors, so a file
    whose tensors alias each other (the reference's MeanFlow students: `timestep_embedder2` aliases the time
    embedder, METHODS 8.12) would otherwise give a model in which training one parameter changes another.
    """
    seen: set[tuple[str, int]] = set()
    out = {}
    for key, tensor in state_dict.items():
        if tensor.device.type == "meta":
            out[key] = tensor
            continue
        storage = (tensor.device.type, tensor.untyped_storage().data_ptr())
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def load_transformer(
    pretrained_model_name_or_path: str,
    subfolder: str | None = "transformer",
    weights_path: str | os.PathLike | None = None,
    time_input_scale: float | None = None,
    dual_timestep: bool = False,
    zero_init_dual: bool = False,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    drop_keys: tuple[str, ...] = (),
) -> FluxTransformer:
    """A FluxTransformer from a diffusers model (folder or hub id), optionally with weights from `weights_path`.

    - `time_input_scale`: override the configured multiplier (1 for rescaled teachers and students).
    - `weights_path`: a .pt ({"module": state_dict}), .safetensors or folder, loaded strictly; the
      architecture still comes from `pretrained_model_name_or_path`.
    - `dual_timestep`: MeanFlow student. If the weights hold no `timestep_embedder2`, it is created as a
      copy of the time embedder (zeroed output layer with `zero_init_dual`).
    - `drop_keys`: prefixes of training-only keys a checkpoint may carry and inference ignores (named and
      logged, e.g. sCM's "logvar_linear."); every other key must still match.
    """
    overrides = {} if time_input_scale is None else {"time_input_scale": time_input_scale}
    hub = {"revision": revision, "variant": variant, "cache_dir": cache_dir}
    if weights_path is None:
        with hub_errors(pretrained_model_name_or_path):
            model = FluxTransformer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **hub,
                                                   **overrides)
    else:
        state_dict = read_state_dict(weights_path)
        dropped = [k for k in state_dict if drop_keys and k.startswith(drop_keys)]
        if dropped:
            logger.info("ignoring training-only keys of %s: %s", weights_path, dropped)
            state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
        with hub_errors(pretrained_model_name_or_path):
            config = FluxTransformer.load_config(
                pretrained_model_name_or_path, subfolder=subfolder, revision=revision, cache_dir=cache_dir
            )
        has_dual = any(k.startswith(DUAL_TIMESTEP_KEYS) for k in state_dict)
        with init_empty_weights():
            model = FluxTransformer.from_config(config, dual_timestep=has_dual, **overrides)
        load_state_dict_strict(model, state_dict, source=str(weights_path), assign=True)
    if dual_timestep and model.timestep_embedder2 is None:
        logger.info("initialising timestep_embedder2 as a copy of the time embedder (zero-init=%s)", zero_init_dual)
        model.add_dual_timestep_embedder(zero_init_last=zero_init_dual)
    elif not dual_timestep and model.timestep_embedder2 is not None:
        raise CheckpointMismatchError(
            f"{weights_path or pretrained_model_name_or_path} holds a dual-timestep (MeanFlow) transformer; "
            "load it with the MeanFlow scripts (test_meanflow.py) instead"
        )
    return model.to(dtype) if dtype is not None else model
