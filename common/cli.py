"""What every entry script shares: one-line errors for a user's mistakes, checked argument types, quiet logs.

A user's mistake (a path that does not exist, a flag out of range, a checkpoint of another kind, a resume with
another number of processes) raises `UsageError`. `run(main)` prints it as one line on stderr,
"<prog>: error: <problem and fix>", and exits with status 2, as argparse does for a bad flag. Any other
exception is a bug and keeps its traceback. `--debug`, or FLUX_DISTILL_DEBUG=1, shows the traceback of user
errors too.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

DEBUG_ENV = "FLUX_DISTILL_DEBUG"
RESOLUTION_MULTIPLE = 16  # FLUX's x8 VAE, then 2x2 latent patches


class UsageError(ValueError):
    """A mistake in the user's input; its message names the problem and the fix, on one line."""


class MissingPathError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what the flag needs)."""


class UnwritablePathError(UsageError, PermissionError):
    """A folder the user named cannot be written."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----- quiet output -----
class _DropMessages(logging.Filter):
    def __init__(self, fragments: Sequence[str]):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# Notices a user can do nothing about: transformers announces, at every import of the FLUX pipeline, that the
# image processors of models we never use fall back to PIL because torchvision is absent (it is not needed).
# diffusers warns at every `.to(dtype)` of a model that lists modules to keep in float32, even when the list is
# empty (FLUX's is): that empty-list case only.
KNOWN_NOISE = {"transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
               "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
               # DeepSpeed, imported by accelerate/transformers, on a machine without a GPU (where we run on CPU)
               "DeepSpeed": ("Setting accelerator to CPU. If you have GPU or other accelerator",)}


def silence_known_noise() -> None:
    """Drop exactly the messages in KNOWN_NOISE (by logger and text); every other warning still shows."""
    for name, fragments in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))


silence_known_noise()


def quiet_libraries() -> None:
    """No progress bars for loading a pipeline's components or a model's weights (diffusers, transformers: one bar
    per component, seven for a FLUX pipeline); download bars (huggingface_hub) stay. Called when the model stack is
    imported (model/__init__.py), after the command line was checked."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # also turns off huggingface_hub's bars: turn those back on
    hub_utils.enable_progress_bars()


# ----- argument types (argparse turns their errors into "argument --flag: message", exit 2) -----
def _number(kind: Callable, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def checked(kind: Callable, accept: Callable[[float], bool], requirement: str, name: str) -> Callable[[str], float]:
    """An argparse type: `kind` parsed from text (finite), refused unless `accept(value)` ("must <requirement>")."""
    def parse(text: str):
        value = _number(kind, text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must {requirement}, got {value:g}")
        return value

    parse.__name__ = name
    return parse


positive_int = checked(int, lambda v: v >= 1, "be >= 1", "positive_int")
nonnegative_int = checked(int, lambda v: v >= 0, "be >= 0", "nonnegative_int")
positive_float = checked(float, lambda v: v > 0, "be > 0", "positive_float")
nonnegative_float = checked(float, lambda v: v >= 0, "be >= 0", "nonnegative_float")
finite_float = checked(float, lambda v: True, "be finite", "finite_float")
probability = checked(float, lambda v: 0 <= v <= 1, "lie in [0, 1]", "probability")  # a number in [0, 1]
decay = checked(float, lambda v: 0 <= v < 1, "lie in [0, 1)", "decay")  # Adam betas, EMA decays


def str2bool(value: str | bool) -> bool:
    """argparse type for the reference's `--flag True/False` booleans."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def resolution(text: str) -> int:
    """An image side that FLUX can take: a positive multiple of 16."""
    value = _number(int, text)
    if value < RESOLUTION_MULTIPLE or value % RESOLUTION_MULTIPLE:
        suggestion = RESOLUTION_MULTIPLE * max(1, round(value / RESOLUTION_MULTIPLE))
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of {RESOLUTION_MULTIPLE} (FLUX packs "
                                         f"2x2 patches of the x8 VAE latent); use e.g. {suggestion}")
    return value


# ----- paths -----
def looks_like_local_path(value: str) -> bool:
    """True for values that can only be a local path (a hub id is "name" or "org/name")."""
    return (os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1
            or (os.sep != "/" and os.sep in value))


def _require(path: str | os.PathLike, flag: str, hint: str, folder: bool) -> Path:
    path = Path(path).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        wrong_kind = "is a file, not a folder" if folder else "is a folder, not a file"
        what = wrong_kind if path.exists() else "does not exist"
        raise MissingPathError(f"{flag} {path} {what}{'; ' + hint if hint else ''}")
    return path


def require_file(path: str | os.PathLike, flag: str, hint: str = "") -> Path:
    return _require(path, flag, hint, folder=False)


def require_dir(path: str | os.PathLike, flag: str, hint: str = "") -> Path:
    return _require(path, flag, hint, folder=True)


def require_writable_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """The folder, created if needed, after a probe file was written and removed in it (one-line error if not)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UnwritablePathError(f"{flag} {folder} is not writable ({err.strerror}); choose another folder") from err
    return folder


def check_pretrained_model(value: str, flag: str = "--pretrained_model_name_or_path") -> str:
    """A local diffusers pipeline folder (with model_index.json) or something that can be a hub id."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise MissingPathError(f"{flag} {value} is not a diffusers pipeline folder (no model_index.json); pass "
                                   "the folder FluxPipeline.save_pretrained wrote, or a hub id such as "
                                   "Freepik/flux.1-lite-8B")
    elif looks_like_local_path(value):
        raise MissingPathError(f"{flag} {value} does not exist; pass a diffusers FLUX pipeline folder or a hub id "
                               "such as Freepik/flux.1-lite-8B")
    return value


def hub_error(value: str, err: Exception, flag: str = "--pretrained_model_name_or_path") -> UsageError:
    """A one-line UsageError for a model or dataset that could not be fetched (offline, typo, no access)."""
    first = one_line(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    offline = " (HF_HUB_OFFLINE is set: only local folders and the local cache can be used)" \
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
    return UsageError(f"{flag} {value} could not be loaded{offline}: {first[:300]}")


# ----- the parser and the entry point -----
def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--debug` and errors on one line ("<prog>: error: <message>", exit 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show full tracebacks for input errors too (or set {DEBUG_ENV}=1)")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def run(main: Callable, argv: Sequence[str] | None = None):
    """Call `main(argv)`; a UsageError becomes one line on stderr and exit status 2 (unless debugging)."""
    try:
        return main(argv)
    except UsageError as err:
        if debug_requested(argv):
            raise
        sys.stderr.flush()
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {one_line(err)}\n")
        sys.stderr.flush()
        raise SystemExit(2)
