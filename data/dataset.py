"""Text-image datasets for FLUX distillation: loading, preprocessing and batching."""

from __future__ import annotations

import argparse
import glob
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import datasets
import numpy as np
import torch
from PIL import Image

from common.cli import MissingPathError, UsageError, hub_error, looks_like_local_path, positive_int

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# FLUX's VAE downsamples by 8 and the transformer packs 2x2 latent patches.
RESOLUTION_MULTIPLE = 16
_BUILDER_BY_EXTENSION = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Add the dataset selection flags (source, columns, split, size) to `parser`."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="Hub dataset id, or a local folder (imagefolder with metadata.jsonl, or parquet files).")
    group.add_argument("--dataset_config_name", type=str, default=None, help="Config name of a hub dataset.")
    group.add_argument("--data_files", type=str, nargs="+", default=None,
                       help="Data files or globs (.parquet, .arrow, .jsonl); with a hub id, files inside that repo.")
    group.add_argument("--image_column", type=str, default="image", help="Column holding the images.")
    group.add_argument("--caption_column", type=str, default="llava", help="Column holding the captions.")
    group.add_argument("--dataset_split", type=str, default="train", help="Dataset split to train on.")
    group.add_argument("--max_train_samples", type=positive_int, default=None,
                       help="Keep only the first N samples (debugging or quick runs).")


def _builder_for_files(data_files: Sequence[str]) -> str:
    """Return the packaged `datasets` builder matching the extension shared by all `data_files`."""
    builders = set()
    for data_file in data_files:
        builder = _BUILDER_BY_EXTENSION.get(Path(data_file).suffix.lower())
        if builder is None:
            raise UsageError(f"Cannot tell the format of data file {data_file!r}; "
                             f"supported extensions: {', '.join(sorted(_BUILDER_BY_EXTENSION))}.")
        builders.add(builder)
    if len(builders) > 1:
        raise UsageError(f"--data_files mixes formats ({', '.join(sorted(builders))}); pass files of one format.")
    return builders.pop()


def _parquet_only_files(directory: Path) -> list[str]:
    """Return the parquet files under `directory` if it holds nothing else (hidden files aside), else []."""
    files = [path for path in sorted(directory.rglob("*")) if path.is_file()
             and not any(part.startswith(".") for part in path.relative_to(directory).parts)]
    if files and all(path.suffix.lower() == ".parquet" for path in files):
        return [str(path) for path in files]
    return []


def _cast_image_structs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Cast columns stored as plain {bytes, path} structs (parquet written by pyarrow) to `datasets.Image`."""
    for name, feature in dataset.features.items():
        if isinstance(feature, dict) and set(feature) == {"bytes", "path"}:
            dataset = dataset.cast_column(name, datasets.Image())
    return dataset


def _load_local_files(data_files: Sequence[str], split: str, cache_dir: Optional[str]) -> datasets.Dataset:
    """Load local data files (paths or globs) with the packaged builder matching their extension."""
    for data_file in data_files:
        if not glob.glob(os.path.expanduser(data_file)):
            raise MissingPathError(f"--data_files {data_file} matches no file")
    dataset = datasets.load_dataset(_builder_for_files(data_files), data_files=list(data_files),
                                    split=split, cache_dir=cache_dir)
    return _cast_image_structs(dataset)


def load_text_image_dataset(
    dataset_name: Optional[PathLike] = None,
    dataset_config_name: Optional[str] = None,
    data_files: Optional[Sequence[PathLike]] = None,
    split: str = "train",
    cache_dir: Optional[str] = None,
) -> datasets.Dataset:
    """Load a text-image dataset from a local folder or file, local data files, or a hub id."""
    files = [os.fspath(path) for path in data_files] if data_files else None
    if dataset_name is None:
        if not files:
            raise UsageError("No dataset given: pass --dataset_name (hub id or local folder) or --data_files.")
        return _load_local_files(files, split, cache_dir)
    local_path = Path(dataset_name)
    if local_path.is_file():
        return _load_local_files([str(local_path)], split, cache_dir)
    if local_path.is_dir():
        parquet_files = _parquet_only_files(local_path)
        if parquet_files:
            return _load_local_files(parquet_files, split, cache_dir)
        return datasets.load_dataset("imagefolder", data_dir=str(local_path), split=split, cache_dir=cache_dir)
    if looks_like_local_path(os.fspath(dataset_name)):
        raise MissingPathError(f"--dataset_name {dataset_name} does not exist; pass a local folder (imagefolder "
                               "with metadata.jsonl, or parquet files), a data file, or a hub dataset id")
    try:
        dataset = datasets.load_dataset(os.fspath(dataset_name), dataset_config_name, data_files=files,
                                        split=split, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise hub_error(os.fspath(dataset_name), err, "--dataset_name") from err
    return _cast_image_structs(dataset)


def validate_resolution(resolution: int) -> None:
    """Raise a UsageError unless `resolution` is a positive multiple of 16."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % RESOLUTION_MULTIPLE:
        suggestion = RESOLUTION_MULTIPLE * max(1, math.ceil(resolution / RESOLUTION_MULTIPLE))
        raise UsageError(f"--resolution {resolution} is not a positive multiple of {RESOLUTION_MULTIPLE} "
                         f"(FLUX packs 2x2 latent patches of the x8 VAE); use e.g. {suggestion}.")


def preprocess_image(image: Image.Image, resolution: int) -> torch.FloatTensor:
    """Resize the short side to `resolution` (bicubic), center crop a square, and map to a [-1, 1] CHW tensor."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_width, new_height = resolution, int(resolution * height / width)
    else:
        new_width, new_height = int(resolution * width / height), resolution
    image = image.resize((new_width, new_height), Image.BICUBIC)
    top = int(round((new_height - resolution) / 2.0))
    left = int(round((new_width - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return (pixels - 0.5) / 0.5


def normalize_caption(caption: Any) -> str:
    """Return `caption` as a string: the first string of a list, "" for None."""
    if caption is None:
        return ""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple)):
        return next((item for item in caption if isinstance(item, str)), "")
    return str(caption)


def _decode_image(value: dict[str, Any]) -> Image.Image:
    """Open an undecoded `datasets.Image` value ({bytes, path}) with PIL and force a full RGB decode."""
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    with Image.open(source) as image:
        return image.convert("RGB")


def _check_column(dataset: datasets.Dataset, column: str, flag: str) -> None:
    """Raise a UsageError naming `column`, the existing columns and `flag` if `column` is missing."""
    if column not in dataset.column_names:
        raise UsageError(f"Column {column!r} not found in the dataset; existing columns: "
                         f"{', '.join(dataset.column_names)}. Choose one with {flag}.")


class TextImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of preprocessed (image, caption) pairs that skips undecodable images."""

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        resolution: int,
        image_column: str = "image",
        caption_column: str = "llava",
        max_samples: Optional[int] = None,
    ) -> None:
        validate_resolution(resolution)
        _check_column(hf_dataset, image_column, "--image_column")
        _check_column(hf_dataset, caption_column, "--caption_column")
        if max_samples is not None:
            hf_dataset = hf_dataset.select(range(max(0, min(max_samples, len(hf_dataset)))))
        if len(hf_dataset) == 0:
            raise UsageError("The dataset is empty (check --dataset_split, --data_files and --max_train_samples).")
        hf_dataset = hf_dataset.select_columns([image_column, caption_column])
        self.dataset = hf_dataset.cast_column(image_column, datasets.Image(decode=False))
        self.resolution = resolution
        self.image_column = image_column
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return item `index`, or the next decodable one (wrapping around) if its image is corrupt."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        for num_skipped in range(len(self)):
            position = (index + num_skipped) % len(self)
            row = self.dataset[position]
            try:
                image = _decode_image(row[self.image_column])
            except Exception as error:  # PIL raises many exception types on corrupt files.
                logger.warning("Skipping undecodable image at index %d: %s", position, error)
                continue
            return {
                "pixel_values": preprocess_image(image, self.resolution),
                "caption": normalize_caption(row[self.caption_column]),
                "num_skipped": num_skipped,
            }
        raise RuntimeError(f"None of the {len(self)} images in the dataset could be decoded; "
                           f"check --image_column {self.image_column!r} and the image files.")


class PromptDataset(torch.utils.data.Dataset):
    """Prompts only, for data-free distillation: the lines of a text file, or the caption column of any dataset
    the data flags accept (read without decoding a single image)."""

    def __init__(self, prompts: Sequence[str], source: str = "prompts"):
        self.prompts = [p for p in (normalize_caption(p).strip() for p in prompts) if p]
        if not self.prompts:
            raise UsageError(f"{source} holds no prompt (every line or caption is empty); pass a file with one prompt "
                             "per line or a dataset whose --caption_column has text")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PromptDataset":
        """From --prompts_file, else from the --caption_column of --dataset_name / --data_files."""
        limit = getattr(args, "max_train_samples", None)
        prompts_file = getattr(args, "prompts_file", None)
        if prompts_file:
            path = Path(prompts_file).expanduser()
            if not path.is_file():
                raise MissingPathError(f"--prompts_file {prompts_file} does not exist; pass a text file with one "
                                       "prompt per line")
            return cls(path.read_text().splitlines()[:limit], f"--prompts_file {prompts_file}")
        dataset = load_text_image_dataset(args.dataset_name, args.dataset_config_name, args.data_files,
                                          args.dataset_split, args.cache_dir)
        _check_column(dataset, args.caption_column, "--caption_column")
        captions = dataset.select_columns([args.caption_column])[args.caption_column]
        return cls(captions[:limit], f"the {args.caption_column!r} column of the dataset")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"caption": self.prompts[index], "num_skipped": 0}


def collate_text_image(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into {"pixel_values": [B, 3, R, R], "captions": list[str], "num_skipped": int}
    (no "pixel_values" for prompt-only items)."""
    out = {
        "captions": [item["caption"] for item in batch],
        "num_skipped": sum(item["num_skipped"] for item in batch),
    }
    for key, value in batch[0].items():  # pixel values, or another world's tensors (e.g. ODE trajectories)
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack([item[key] for item in batch])
    return out


def build_dataloader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
) -> torch.utils.data.DataLoader:
    """Build a plain DataLoader whose shuffling order is fixed by `seed`."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_text_image,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
