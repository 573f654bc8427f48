"""Tests for the data package: preprocessing geometry, loading, error messages, corrupt images, batching."""

import argparse
import io
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data import (
    TextImageDataset,
    add_dataset_args,
    build_dataloader,
    collate_text_image,
    load_text_image_dataset,
    make_synthetic_dataset,
    normalize_caption,
    preprocess_image,
)
from data.synthetic import corrupt_positions, main as synthetic_main

RESOLUTION = 32


def to_unit_range(image: Image.Image) -> np.ndarray:
    """Map a PIL RGB image to a CHW float array in [-1, 1], the reference normalisation."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Return an RGB image of uniform noise, so any geometric offset changes the pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def load(path: Path, tmp_path: Path, **kwargs) -> datasets.Dataset:
    """Load a synthetic dataset with a cache under `tmp_path`."""
    key = "data_files" if path.suffix == ".parquet" else "dataset_name"
    value = [str(path)] if key == "data_files" else str(path)
    return load_text_image_dataset(**{key: value}, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def make_dataset(tmp_path: Path, name: str = "images", **kwargs) -> TextImageDataset:
    """Write a synthetic dataset and wrap it at RESOLUTION."""
    path = make_synthetic_dataset(tmp_path / name, resolution=64, **kwargs)
    return TextImageDataset(load(path, tmp_path), RESOLUTION)


# Preprocessing.

def test_preprocess_shape_dtype_and_range():
    output = preprocess_image(noise_image(50, 70), RESOLUTION)
    assert output.shape == (3, RESOLUTION, RESOLUTION)
    assert output.dtype == torch.float32
    assert output.min() >= -1.0 and output.max() <= 1.0
    assert torch.all(preprocess_image(Image.new("RGB", (40, 40), "white"), 16) == 1.0)
    assert torch.all(preprocess_image(Image.new("RGB", (40, 40), "black"), 16) == -1.0)


def test_preprocess_converts_grayscale_and_rgba_to_rgb():
    assert preprocess_image(Image.new("L", (20, 30), 255), 16).shape == (3, 16, 16)
    assert preprocess_image(Image.new("RGBA", (30, 20), (0, 0, 0, 0)), 16).shape == (3, 16, 16)


def test_preprocess_resizes_short_side_and_center_crops_wide_image():
    stripes = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # four 32-pixel vertical stripes
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    for i, colour in enumerate(stripes):
        pixels[:, 32 * i:32 * (i + 1)] = colour
    image = Image.fromarray(pixels, mode="RGB")

    output = preprocess_image(image, RESOLUTION).numpy()

    # 128x64 -> 64x32 (short side 32), then columns 16..47 are kept: only the two middle stripes remain.
    expected = to_unit_range(image.resize((64, 32), Image.BICUBIC).crop((16, 0, 48, 32)))
    np.testing.assert_allclose(output, expected, atol=1e-6)
    green, blue = to_unit_range(Image.new("RGB", (1, 1), stripes[1]))[:, 0, 0], \
        to_unit_range(Image.new("RGB", (1, 1), stripes[2]))[:, 0, 0]
    np.testing.assert_allclose(output[:, :, 2:14], np.broadcast_to(green[:, None, None], (3, 32, 12)), atol=1e-6)
    np.testing.assert_allclose(output[:, :, 18:30], np.broadcast_to(blue[:, None, None], (3, 32, 12)), atol=1e-6)


@pytest.mark.parametrize("size, resized, box", [
    ((64, 70), (32, 35), (0, 2, 32, 34)),   # tall: height 35, top = round(1.5) = 2
    ((70, 64), (35, 32), (2, 0, 34, 32)),   # wide: width 35, left = round(1.5) = 2
    ((100, 64), (50, 32), (9, 0, 41, 32)),  # wide: width int(32 * 100 / 64) = 50, left = 9
    ((48, 48), (32, 32), (0, 0, 32, 32)),   # square: plain bicubic downscale
    ((16, 24), (32, 48), (0, 8, 32, 40)),   # upscale of a small tall image
])
def test_preprocess_matches_pil_bicubic_resize_and_crop_offsets(size, resized, box):
    image = noise_image(*size, seed=sum(size))
    expected = to_unit_range(image.resize(resized, Image.BICUBIC).crop(box))
    np.testing.assert_allclose(preprocess_image(image, RESOLUTION).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("caption, expected", [
    ("a red circle", "a red circle"),
    (["first", "second"], "first"),
    ([None, "second"], "second"),
    ([], ""),
    (None, ""),
])
def test_normalize_caption(caption, expected):
    assert normalize_caption(caption) == expected


# Loading.

def test_imagefolder_and_parquet_give_identical_items(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "folder", num_images=6, seed=3, format="imagefolder")
    parquet = make_synthetic_dataset(tmp_path / "parquet", num_images=6, seed=3, format="parquet")
    assert folder.is_dir() and parquet.name == "train.parquet"

    from_folder = TextImageDataset(load(folder, tmp_path), RESOLUTION)
    from_parquet = TextImageDataset(load(parquet, tmp_path), RESOLUTION)

    assert len(from_folder) == len(from_parquet) == 6
    for a, b in zip(from_folder, from_parquet):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert a["caption"] == b["caption"] and a["caption"].startswith("a photo of a ")
        assert a["num_skipped"] == b["num_skipped"] == 0


def test_parquet_loads_from_folder_glob_and_dataset_name(tmp_path):
    parquet = make_synthetic_dataset(tmp_path / "parquet", num_images=4, format="parquet")
    cache_dir = str(tmp_path / "hf_cache")
    loaded = [
        load_text_image_dataset(data_files=[str(tmp_path / "parquet" / "*.parquet")], cache_dir=cache_dir),
        load_text_image_dataset(dataset_name=str(parquet.parent), cache_dir=cache_dir),
        load_text_image_dataset(dataset_name=str(parquet), cache_dir=cache_dir),
    ]
    for dataset in loaded:
        assert isinstance(dataset.features["image"], datasets.Image)  # pyarrow struct cast to Image
        assert dataset["llava"] == loaded[0]["llava"]


def test_synthetic_data_is_deterministic_per_seed_and_has_non_square_images(tmp_path):
    same_a = make_synthetic_dataset(tmp_path / "a", num_images=8, seed=1)
    same_b = make_synthetic_dataset(tmp_path / "b", num_images=8, seed=1)
    other = make_synthetic_dataset(tmp_path / "c", num_images=8, seed=2)
    files = sorted(path.name for path in same_a.glob("*.png"))
    assert len(files) == 8
    assert all((same_a / name).read_bytes() == (same_b / name).read_bytes() for name in files)
    assert any((same_a / name).read_bytes() != (other / name).read_bytes() for name in files)
    sizes = {Image.open(same_a / name).size for name in files}
    assert any(width != height for width, height in sizes)


def test_synthetic_cli_writes_parquet(tmp_path, capsys):
    synthetic_main(["--output_dir", str(tmp_path / "cli"), "--num_images", "3", "--format", "parquet"])
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "cli" / "train.parquet" and path.is_file()
    assert len(load(path, tmp_path)) == 3


def test_loader_without_source_asks_for_dataset_name_or_data_files():
    with pytest.raises(ValueError, match="--dataset_name.*--data_files"):
        load_text_image_dataset()


def test_loader_rejects_unknown_data_file_extension(tmp_path):
    with pytest.raises(ValueError, match="images.zip"):
        load_text_image_dataset(data_files=[str(tmp_path / "images.zip")])


def test_add_dataset_args_defaults_and_values():
    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    defaults = parser.parse_args([])
    assert (defaults.dataset_name, defaults.data_files, defaults.max_train_samples) == (None, None, None)
    assert (defaults.image_column, defaults.caption_column, defaults.dataset_split) == ("image", "llava", "train")
    args = parser.parse_args(["--data_files", "a.parquet", "b.parquet", "--max_train_samples", "5"])
    assert args.data_files == ["a.parquet", "b.parquet"] and args.max_train_samples == 5


# Validation errors.

@pytest.mark.parametrize("column, flag", [("image_column", "--image_column"),
                                          ("caption_column", "--caption_column")])
def test_missing_column_error_lists_existing_columns(column, flag):
    hf_dataset = datasets.Dataset.from_dict({"image": ["x.png"], "llava": ["a caption"], "prompt": ["p"]})
    with pytest.raises(ValueError) as error:
        TextImageDataset(hf_dataset, RESOLUTION, **{column: "missing_col"})
    message = str(error.value)
    assert "missing_col" in message and flag in message
    assert all(name in message for name in ("image", "llava", "prompt"))


def test_empty_dataset_errors():
    empty = datasets.Dataset.from_dict({"image": [], "llava": []})
    with pytest.raises(ValueError, match="empty"):
        TextImageDataset(empty, RESOLUTION)
    one_row = datasets.Dataset.from_dict({"image": ["x.png"], "llava": ["c"]})
    with pytest.raises(ValueError, match="empty"):
        TextImageDataset(one_row, RESOLUTION, max_samples=0)


@pytest.mark.parametrize("resolution", [500, 24, 0, -16])
def test_resolution_must_be_positive_multiple_of_16(resolution):
    hf_dataset = datasets.Dataset.from_dict({"image": ["x.png"], "llava": ["c"]})
    with pytest.raises(ValueError, match=f"--resolution {resolution} is not a positive multiple of 16"):
        TextImageDataset(hf_dataset, resolution)


def test_resolution_error_suggests_a_valid_value():
    hf_dataset = datasets.Dataset.from_dict({"image": ["x.png"], "llava": ["c"]})
    with pytest.raises(ValueError, match="use e.g. 512"):
        TextImageDataset(hf_dataset, 500)


def test_max_samples_truncates(tmp_path):
    path = make_synthetic_dataset(tmp_path / "images", num_images=5)
    assert len(TextImageDataset(load(path, tmp_path), RESOLUTION, max_samples=3)) == 3


# Corrupt images.

@pytest.mark.parametrize("format", ["imagefolder", "parquet"])
def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, caplog, format):
    dataset = make_dataset(tmp_path, num_images=8, num_corrupt=2, format=format)
    bad = corrupt_positions(8, 2)
    assert bad == [0, 4]
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        items = [dataset[i] for i in range(len(dataset))]

    assert sum(item["num_skipped"] for item in items) == 2
    assert [item["num_skipped"] for item in items] == [1 if i in bad else 0 for i in range(8)]
    for i in bad:  # replaced by the next item
        assert torch.equal(items[i]["pixel_values"], items[i + 1]["pixel_values"])
        assert items[i]["caption"] == items[i + 1]["caption"]
    assert all(f"index {i}" in caplog.text for i in bad)


def png_bytes(colour: str) -> bytes:
    """Return the PNG encoding of a small plain image."""
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_last_item_wraps_around_and_list_captions_use_first_string():
    features = datasets.Features({"image": datasets.Image(), "llava": datasets.Sequence(datasets.Value("string"))})
    hf_dataset = datasets.Dataset.from_dict({
        "image": [{"bytes": png_bytes("red"), "path": None}, {"bytes": png_bytes("blue"), "path": None},
                  {"bytes": b"garbage", "path": None}],
        "llava": [["red", "alt"], ["blue"], ["corrupt"]],
    }, features=features)
    dataset = TextImageDataset(hf_dataset, 16)
    item = dataset[2]
    assert item["num_skipped"] == 1 and item["caption"] == "red"
    assert torch.equal(item["pixel_values"], dataset[0]["pixel_values"])
    assert torch.equal(dataset[-1]["pixel_values"], item["pixel_values"])
    with pytest.raises(IndexError):
        dataset[3]


def test_all_corrupt_images_raise_instead_of_looping(tmp_path):
    dataset = make_dataset(tmp_path, num_images=3, num_corrupt=3)
    with pytest.raises(RuntimeError, match="None of the 3 images"):
        dataset[1]


def test_epoch_of_batches_counts_each_corrupt_image_once(tmp_path):
    dataset = make_dataset(tmp_path, num_images=8, num_corrupt=2)
    batches = list(build_dataloader(dataset, batch_size=4, seed=5))
    assert len(batches) == 2
    assert sum(batch["num_skipped"] for batch in batches) == 2


# Batching.

def test_collate_stacks_and_sums():
    items = [{"pixel_values": torch.zeros(3, 16, 16), "caption": "a", "num_skipped": 1},
             {"pixel_values": torch.ones(3, 16, 16), "caption": "b", "num_skipped": 2}]
    batch = collate_text_image(items)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["captions"] == ["a", "b"] and batch["num_skipped"] == 3


def test_dataloader_batches_and_is_reproducible_for_a_seed(tmp_path):
    dataset = make_dataset(tmp_path, num_images=8)

    def epoch(seed: int, shuffle: bool = True) -> torch.Tensor:
        batches = list(build_dataloader(dataset, batch_size=3, seed=seed, shuffle=shuffle))
        assert len(batches) == 2  # drop_last drops the 2 leftover items
        for batch in batches:
            assert batch["pixel_values"].shape == (3, 3, RESOLUTION, RESOLUTION)
            assert batch["pixel_values"].dtype == torch.float32
            assert len(batch["captions"]) == 3 and all(isinstance(c, str) for c in batch["captions"])
        return torch.cat([batch["pixel_values"] for batch in batches])

    assert torch.equal(epoch(seed=0), epoch(seed=0))
    assert not torch.equal(epoch(seed=0), epoch(seed=1))
    in_order = torch.stack([dataset[i]["pixel_values"] for i in range(6)])
    assert torch.equal(epoch(seed=0, shuffle=False), in_order)
