"""GenEval prompts and the GenEval output layout (METHODS 5.4), and the sampling driver every test_*.py uses.

Layout written: `<run>/<NNNNN>/metadata.jsonl` (one line: the prompt's metadata object) and
`<run>/<NNNNN>/samples/<NNNN>.png`. A prompt folder appears only when all its images are written (it is
assembled under a temporary name and renamed), so an interrupted run resumes by skipping finished folders.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from common.cli import UsageError, require_file

EVAL_DIR = Path(__file__).resolve().parent
DEFAULT_METADATA = EVAL_DIR / "evaluation_metadata.jsonl"
RUN_CONFIG = "run_config.json"


def load_prompts(
    prompts_file: str | os.PathLike | None = None,
    metadata_file: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[dict]:
    """GenEval metadata objects (each with a "prompt"); a plain prompts file gives {"prompt": line} objects.

    With neither file, the 553 GenEval prompts shipped in evaluation/.
    """
    if prompts_file and metadata_file:
        raise UsageError("pass either --prompts_file or --metadata_file, not both")
    if prompts_file:
        lines = [line.strip() for line in require_file(prompts_file, "--prompts_file").read_text().splitlines()]
        items = [{"prompt": line} for line in lines if line]
    else:
        path = require_file(metadata_file, "--metadata_file") if metadata_file else DEFAULT_METADATA
        items = []
        for n, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path} line {n + 1} is not JSON ({err.msg}); a GenEval metadata file holds one "
                                 "JSON object per line") from err
            if not isinstance(item, dict) or "prompt" not in item:
                raise UsageError(f"{path} line {n + 1} has no 'prompt' key; pass GenEval-format metadata or use "
                                 "--prompts_file for plain prompts")
            items.append(item)
    if not items:
        raise UsageError(f"no prompts found in {prompts_file or metadata_file}; the file is empty")
    return items[:limit] if limit is not None else items


def run_dir(output_dir: str | os.PathLike, resolution: int, num_steps: int, guidance_scale: float,
            global_step: int = 0) -> Path:
    """`<out>/GenEval_RESOLUTION{R}_NFE{N}_cfg{g}/images/global_steps{k}`, the reference's folder names."""
    return Path(output_dir) / f"GenEval_RESOLUTION{resolution}_NFE{num_steps}_cfg{guidance_scale}" / "images" / \
        f"global_steps{global_step}"


def prompt_dir(run: Path, index: int) -> Path:
    return run / f"{index:05d}"


def is_complete(run: Path, index: int, images_per_prompt: int) -> bool:
    folder = prompt_dir(run, index)
    return (folder / "metadata.jsonl").exists() and all(
        (folder / "samples" / f"{j:04d}.png").exists() for j in range(images_per_prompt)
    )


def write_prompt(run: Path, index: int, metadata: dict, images: Sequence) -> Path:
    """Write one prompt's folder atomically: build it under a temporary name, then rename into place."""
    final = prompt_dir(run, index)
    tmp = run / f".tmp-{index:05d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "samples").mkdir(parents=True)
    (tmp / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    for j, image in enumerate(images):
        image.save(tmp / "samples" / f"{j:04d}.png")
    shutil.rmtree(final, ignore_errors=True)  # an incomplete folder from an older, interrupted layout
    os.replace(tmp, final)
    return final


def check_run_config(run: Path, config: dict) -> None:
    """Refuse to mix images made with different settings in one folder; record the settings otherwise."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / RUN_CONFIG
    if path.exists():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
        if changed:
            raise UsageError(
                f"{run} already holds images made with other settings {changed} (old, new); "
                "use another --output_dir or delete that folder"
            )
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp, path)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image: a function of (seed, prompt, image) only, never of batching or sharding."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Shard:
    """This process's share of the prompts when several processes sample at once (torchrun / accelerate)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Shard":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def indices(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world_size))


def generate_geneval(
    generate: Callable[[list[str], list[torch.Generator]], list],
    prompts: list[dict],
    run: Path,
    images_per_prompt: int = 4,
    batch_size: int = 1,
    seed: int = 42,
    shard: Shard | None = None,
    config: dict | None = None,
) -> tuple[int, int]:
    """Sample this shard's unfinished prompts in batches and write them; returns (written, skipped).

    `generate(prompt_texts, generators)` returns images_per_prompt PIL images per prompt, in order, using
    one generator per image (prompt-major), so every image depends only on its own seed.
    """
    shard = shard or Shard()
    check_run_config(run, {**(config or {}), "images_per_prompt": images_per_prompt, "seed": seed})
    mine = shard.indices(len(prompts))
    todo = [i for i in mine if not is_complete(run, i, images_per_prompt)]
    bar = tqdm(total=len(todo), desc=f"GenEval rank {shard.rank}", position=shard.rank, unit="prompt")
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        generators = [
            torch.Generator("cpu").manual_seed(image_seed(seed, i, j)) for i in batch for j in range(images_per_prompt)
        ]
        images = generate([prompts[i]["prompt"] for i in batch], generators)
        for k, i in enumerate(batch):
            write_prompt(run, i, prompts[i], images[k * images_per_prompt:(k + 1) * images_per_prompt])
        bar.update(len(batch))
    bar.close()
    return len(todo), len(mine) - len(todo)
