"""Deterministic synthetic image-caption dataset of coloured shapes, for tests and demos."""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 50, 170),
    "orange": (240, 130, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "ellipse", "rectangle")
FORMATS = ("imagefolder", "parquet")


def _image_size(rng: random.Random, resolution: int) -> tuple[int, int]:
    """Pick a (width, height): square, landscape 4:3, portrait 3:4 or wide 3:2."""
    three_quarters, three_halves = resolution * 3 // 4, resolution * 3 // 2
    return rng.choice([(resolution, resolution), (resolution, three_quarters),
                       (three_quarters, resolution), (three_halves, resolution)])


def _shape_box(rng: random.Random, shape: str, width: int, height: int) -> tuple[int, int, int, int]:
    """Pick a bounding box inside the image: square for circles and squares, elongated otherwise."""
    short = min(width, height)
    box_width = rng.randint(short // 3, short * 3 // 4)
    box_height = box_width if shape in ("circle", "square") else max(2, box_width // 2)
    left = rng.randint(0, width - box_width)
    top = rng.randint(0, height - box_height)
    return left, top, left + box_width - 1, top + box_height - 1


def make_shape_image(rng: random.Random, resolution: int) -> tuple[bytes, str]:
    """Draw one random coloured shape on a plain background; return its PNG bytes and caption."""
    colour, background, shape = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)), rng.choice(SHAPES)
    width, height = _image_size(rng, resolution)
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    box = _shape_box(rng, shape, width, height)
    draw = ImageDraw.Draw(image)
    if shape in ("circle", "ellipse"):
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.rectangle(box, fill=COLOURS[colour])
    return png_bytes(image), f"a photo of a {colour} {shape} on a {background} background"


def corrupt_positions(num_images: int, num_corrupt: int) -> list[int]:
    """Spread `num_corrupt` indices evenly over `num_images` rows, starting at 0."""
    return [k * num_images // num_corrupt for k in range(num_corrupt)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_records(output_dir: Union[str, Path], records: Iterable[tuple[str, bytes, str]], format: str = "imagefolder",
                  caption_column: str = "llava", rows_per_group: int = 1000) -> Path:
    """Write (file name, encoded image, caption) records as a dataset; return the path to load it from.

    "imagefolder": the image files plus metadata.jsonl {file_name, <caption_column>: caption} (returns the folder).
    "parquet": train.parquet with an image {bytes, path} struct column and a caption column (returns the file),
    written in row groups so records can stream.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; choose one of {', '.join(FORMATS)}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = iter(records)
    if format == "imagefolder":
        with open(output_dir / "metadata.jsonl", "w") as metadata:
            for file_name, data, caption in records:
                (output_dir / file_name).write_bytes(data)
                metadata.write(json.dumps({"file_name": file_name, caption_column: caption}) + "\n")
        return output_dir
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        (caption_column, pa.string())])
    path = output_dir / "train.parquet"
    with pq.ParquetWriter(path, schema) as writer:
        while rows := list(itertools.islice(records, rows_per_group)):
            writer.write_table(pa.table({
                "image": [{"bytes": data, "path": file_name} for file_name, data, _ in rows],
                caption_column: [caption for _, _, caption in rows],
            }, schema=schema))
    return path


def make_synthetic_dataset(
    output_dir: Union[str, Path],
    num_images: int = 8,
    resolution: int = 64,
    seed: int = 0,
    format: str = "imagefolder",
    caption_column: str = "llava",
    num_corrupt: int = 0,
) -> Path:
    """Write `num_images` shape images (of which `num_corrupt` are garbage bytes) and return the loader path.

    The path is the folder for "imagefolder" and the parquet file for "parquet"; corrupt rows sit at
    `corrupt_positions(num_images, num_corrupt)`.
    """
    if not 0 <= num_corrupt <= num_images:
        raise ValueError(f"num_corrupt must be between 0 and num_images ({num_images}), got {num_corrupt}.")
    rng = random.Random(seed)
    corrupt = set(corrupt_positions(num_images, num_corrupt))
    records = []
    for index in range(num_images):
        data, caption = make_shape_image(rng, resolution)
        if index in corrupt:
            data, caption = f"corrupt image {index}".encode(), "a corrupt image"
        records.append((f"{index:05d}.png", data, caption))
    return write_records(output_dir, records, format, caption_column)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line entry point: write a synthetic dataset and print the path to load it from."""
    from common.cli import ArgumentParser, nonnegative_int, positive_int

    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_images", type=positive_int, default=8)
    parser.add_argument("--resolution", type=positive_int, default=64,
                        help="Base image size; some images are non-square.")
    parser.add_argument("--format", choices=FORMATS, default="imagefolder")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    args = parser.parse_args(argv)
    path = make_synthetic_dataset(args.output_dir, num_images=args.num_images, resolution=args.resolution,
                                  seed=args.seed, format=args.format)
    print(path)


if __name__ == "__main__":
    from common.cli import run

    run(main)
