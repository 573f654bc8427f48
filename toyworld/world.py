"""A procedural toy text-to-image world of coloured shapes that mirrors GenEval's six prompt categories.

Objects are `SHAPES` in `COLORS` on a plain light-gray `BACKGROUND`, axis-aligned, never overlapping
(rejection sampling with a margin), sized 25-37.5% of the image side (16-24 px at 64 px, 8-12 px at
32 px; at most 31% with three or more objects), and drawn 4x supersampled then box-downsampled, so edges
are anti-aliased like a generated image's. Five shapes: circle, square, triangle, cross (arms 0.4 of the side)
and ring (hole 0.5 of the side), so that a category's chance level is low enough to read a score against (single
object: 1/5); the analytic detector reads all five exactly at 64 and 32 px, also blurred. A diamond was tried
and is the first to be mistaken for a circle once images are blurred.

Prompts and metadata follow GenEval's templates and keys (`tag`, `include` [{class, count, color?,
position?}], `exclude` for counting, `prompt`):

    single_object  a photo of a circle                 (colour free)
    two_object     a photo of a circle and a square    (colours free)
    counting       a photo of three triangles          (exclude {count: n + 1} makes it "exactly n")
    colors         a photo of a blue square
    position       a photo of a circle left of a square   (include = [square, circle + position [rel, 0]])
    color_attr     a photo of a red circle and a blue square

Counts are 1-4 (mostly 2-4; GenEval's counting uses 2-4). Two-object prompts use two different shapes,
colour_attr prompts two different colours.

Training images and evaluation prompts come from different seed streams (`TRAIN_STREAM`, `EVAL_STREAM`),
so they are independent draws; the prompt space is small (3 single_object prompts, 6 two_object, ...),
so evaluation prompt *strings* do repeat training ones (and each other): held-out means a fresh draw,
not disjoint text. Generalisation is then measured over layouts, sizes and sampling noise, as intended
for scoring few-step students against their teacher.

CLI:
    python -m toyworld.world dataset --output_dir D --num_images N [--resolution 64] [--format parquet]
    python -m toyworld.world eval --output FILE [--per_tag 50]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data.synthetic import FORMATS, png_bytes, write_records

SHAPES = ("circle", "square", "triangle", "cross", "ring")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "ring": "rings"}
CROSS_ARM = 0.4  # width of a cross's arms, as a fraction of its side
RING_HOLE = 0.5  # diameter of a ring's hole, as a fraction of its side
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "yellow": (245, 205, 0),
    "green": (20, 170, 40),
    "blue": (25, 60, 225),
    "purple": (160, 30, 200),
    "black": (20, 20, 20),
}
BACKGROUND = (235, 235, 235)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNT_WEIGHTS = {1: 0.1, 2: 0.3, 3: 0.3, 4: 0.3}

# Geometry, as fractions of the image side.
SIZE_RANGE = (0.25, 0.375)  # object side: 16-24 px at 64 px, 8-12 px at 32 px
CROWDED_SIZE_RANGE = (0.25, 0.31)  # with three or more objects, so they fit without overlap
GAP = 0.06  # minimum gap between object boxes
BORDER = 0.03  # minimum gap between an object box and the image border
SUPERSAMPLE = 4
MAX_LAYOUT_TRIES = 2000

TRAIN_STREAM = 0
EVAL_STREAM = 1


@dataclass(frozen=True)
class PlacedObject:
    """One object of a scene: its class, colour, box centre and side length, in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels."""
        half = self.size / 2
        return self.cx - half, self.cy - half, self.cx + half, self.cy + half


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _pick_two(rng: np.random.Generator, options: Sequence[str]) -> tuple[str, str]:
    """Two different options, in random order."""
    first, second = rng.permutation(len(options))[:2]
    return options[first], options[second]


def count_phrase(shape: str, count: int) -> str:
    """'one circle', 'three triangles'."""
    return f"{NUMBER_WORDS[count]} {shape if count == 1 else PLURALS[shape]}"


def sample_metadata(tag: str, rng: np.random.Generator) -> dict:
    """A random GenEval-format metadata object (tag, include, [exclude], prompt) of category `tag`."""
    if tag == "single_object":
        shape = _pick(rng, SHAPES)
        return {"tag": tag, "include": [{"class": shape, "count": 1}], "prompt": f"a photo of a {shape}"}
    if tag == "two_object":
        a, b = _pick_two(rng, SHAPES)
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of a {a} and a {b}"}
    if tag == "counting":
        shape = _pick(rng, SHAPES)
        count = int(rng.choice(list(COUNT_WEIGHTS), p=list(COUNT_WEIGHTS.values())))
        return {"tag": tag, "include": [{"class": shape, "count": count}],
                "exclude": [{"class": shape, "count": count + 1}],
                "prompt": f"a photo of {count_phrase(shape, count)}"}
    if tag == "colors":
        shape, color = _pick(rng, SHAPES), _pick(rng, list(COLORS))
        return {"tag": tag, "include": [{"class": shape, "count": 1, "color": color}],
                "prompt": f"a photo of a {color} {shape}"}
    if tag == "position":
        subject, target = _pick_two(rng, SHAPES)
        relation = _pick(rng, RELATIONS)
        return {"tag": tag, "include": [{"class": target, "count": 1},
                                        {"class": subject, "count": 1, "position": [relation, 0]}],
                "prompt": f"a photo of a {subject} {relation} a {target}"}
    if tag == "color_attr":
        (a, b), (color_a, color_b) = _pick_two(rng, SHAPES), _pick_two(rng, list(COLORS))
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": color_a},
                                        {"class": b, "count": 1, "color": color_b}],
                "prompt": f"a photo of a {color_a} {a} and a {color_b} {b}"}
    raise ValueError(f"unknown tag {tag!r}; choose one of {', '.join(TAGS)}")


def boxes_apart(a: PlacedObject, b: PlacedObject, gap: float) -> bool:
    """True when the boxes of `a` and `b` are at least `gap` apart along x or along y."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def relation_holds(subject: PlacedObject, target: PlacedObject, relation: str, gap: float) -> bool:
    """The world's (stricter than GenEval's) notion of "subject <relation> target".

    The boxes are separated by `gap` along the relation's axis and the centre offset lies within ~27
    degrees of that axis, so GenEval's test (see toyworld.scorer.relative_position) passes with margin.
    """
    dx, dy = subject.cx - target.cx, subject.cy - target.cy
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along >= (subject.size + target.size) / 2 + gap and abs(across) <= along / 2


def _scene_objects(metadata: dict, rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """(include entry index, shape, colour) of every object the metadata asks for; free colours drawn at random."""
    return [(entry_index, entry["class"], entry.get("color") or _pick(rng, list(COLORS)))
            for entry_index, entry in enumerate(metadata["include"]) for _ in range(entry["count"])]


def _try_layout(objects: list[tuple[int, str, str]], rng: np.random.Generator, resolution: int) -> list[PlacedObject]:
    """One attempt at placing every object without overlap; [] when an object does not fit."""
    low, high = CROWDED_SIZE_RANGE if len(objects) >= 3 else SIZE_RANGE
    gap, border = GAP * resolution, BORDER * resolution
    placed: list[PlacedObject] = []
    for _, shape, color in objects:
        size = rng.uniform(low, high) * resolution
        for _ in range(100):
            cx, cy = rng.uniform(border + size / 2, resolution - border - size / 2, size=2)
            candidate = PlacedObject(shape, color, float(cx), float(cy), float(size))
            if all(boxes_apart(candidate, other, gap) for other in placed):
                placed.append(candidate)
                break
        else:
            return []
    return placed


def _relations_hold(placed: list[PlacedObject], groups: list[int], metadata: dict, gap: float) -> bool:
    """Every object of an include entry with a position is in that relation to every object of its target."""
    for subject_entry, entry in enumerate(metadata["include"]):
        if "position" in entry:
            relation, target_entry = entry["position"]
            subjects = [obj for obj, group in zip(placed, groups) if group == subject_entry]
            targets = [obj for obj, group in zip(placed, groups) if group == target_entry]
            if not all(relation_holds(s, t, relation, gap) for s in subjects for t in targets):
                return False
    return True


def layout(metadata: dict, rng: np.random.Generator, resolution: int = 64) -> list[PlacedObject]:
    """Place the objects of `metadata` (counts, colours, relative positions) in a `resolution` square,
    in the order of its include entries."""
    objects = _scene_objects(metadata, rng)
    groups = [entry_index for entry_index, _, _ in objects]
    for _ in range(MAX_LAYOUT_TRIES):
        placed = _try_layout(objects, rng, resolution)
        if placed and _relations_hold(placed, groups, metadata, GAP * resolution):
            return placed
    raise RuntimeError(f"could not lay out {metadata['prompt']!r} at {resolution} px")


def _draw_shape(draw: ImageDraw.ImageDraw, obj: PlacedObject, scale: int) -> None:
    x0, y0, x1, y1 = (v * scale for v in obj.box)
    cx = obj.cx * scale
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif obj.shape == "cross":
        half_arm = CROSS_ARM * (x1 - x0) / 2
        cy = obj.cy * scale
        draw.rectangle((cx - half_arm, y0, cx + half_arm - 1, y1 - 1), fill=fill)
        draw.rectangle((x0, cy - half_arm, x1 - 1, cy + half_arm - 1), fill=fill)
    elif obj.shape == "ring":
        inset = (1 - RING_HOLE) * (x1 - x0) / 2
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        draw.ellipse((x0 + inset, y0 + inset, x1 - inset - 1, y1 - inset - 1), fill=BACKGROUND)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; choose one of {', '.join(SHAPES)}")


def draw(objects: Sequence[PlacedObject], resolution: int = 64) -> Image.Image:
    """Draw `objects` on the background, supersampled then box-filtered to `resolution` (anti-aliased)."""
    canvas = Image.new("RGB", (resolution * SUPERSAMPLE,) * 2, BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_shape(pen, obj, SUPERSAMPLE)
    return canvas.resize((resolution, resolution), Image.BOX)


def render(metadata: dict, rng: np.random.Generator, resolution: int = 64) -> Image.Image:
    """An image satisfying `metadata` (GenEval format), with free colours and the layout drawn from `rng`."""
    return draw(layout(metadata, rng, resolution), resolution)


def training_layout(index: int, seed: int = 0, resolution: int = 64) -> tuple[dict, list[PlacedObject]]:
    """Training example `index` before drawing: (metadata, placed objects). Tags cycle through `TAGS`; its rng
    depends on (seed, index) only."""
    rng = np.random.default_rng([TRAIN_STREAM, seed, index])
    metadata = sample_metadata(TAGS[index % len(TAGS)], rng)
    return metadata, layout(metadata, rng, resolution)


def training_example(index: int, seed: int = 0, resolution: int = 64) -> tuple[dict, Image.Image]:
    """Training example `index`, drawn: (metadata, image)."""
    metadata, placed = training_layout(index, seed, resolution)
    return metadata, draw(placed, resolution)


def eval_metadata(num_prompts_per_tag: int = 50, seed: int = 0) -> list[dict]:
    """Evaluation prompts grouped by tag (as in GenEval's file), from the evaluation seed stream."""
    return [sample_metadata(tag, np.random.default_rng([EVAL_STREAM, seed, tag_index, k]))
            for tag_index, tag in enumerate(TAGS) for k in range(num_prompts_per_tag)]


def write_eval_metadata(path: str | os.PathLike, num_prompts_per_tag: int = 50, seed: int = 0) -> list[dict]:
    """Write held-out evaluation prompts as GenEval metadata .jsonl (one object per line); return them."""
    prompts = eval_metadata(num_prompts_per_tag, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in prompts))
    return prompts


def _examples(num_images: int, resolution: int, seed: int) -> Iterator[tuple[str, bytes, str]]:
    """(file name, PNG bytes, prompt) of the training examples, in order."""
    for index in range(num_images):
        metadata, image = training_example(index, seed, resolution)
        yield f"{index:06d}.png", png_bytes(image), metadata["prompt"]


def write_dataset(
    output_dir: str | os.PathLike,
    num_images: int,
    resolution: int = 64,
    seed: int = 0,
    format: str = "imagefolder",
    caption_column: str = "llava",
) -> Path:
    """Write a training set with the six tags in equal shares; return the path to load it from.

    "imagefolder": `<output_dir>/NNNNNN.png` + metadata.jsonl {file_name, <caption_column>: prompt}.
    "parquet": `<output_dir>/train.parquet` with an image {bytes, path} struct column and a caption column.
    """
    return write_records(output_dir, _examples(num_images, resolution, seed), format, caption_column)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: write a training dataset or held-out evaluation prompts."""
    from common.cli import ArgumentParser, nonnegative_int, positive_int

    parser = ArgumentParser(description="Toy GenEval-style text-to-image world.")
    commands = parser.add_subparsers(dest="command", required=True)
    dataset = commands.add_parser("dataset", help="write a training dataset")
    dataset.add_argument("--output_dir", required=True)
    dataset.add_argument("--num_images", type=positive_int, required=True)
    dataset.add_argument("--resolution", type=positive_int, default=64)
    dataset.add_argument("--format", choices=FORMATS, default="imagefolder")
    dataset.add_argument("--caption_column", default="llava")
    dataset.add_argument("--seed", type=nonnegative_int, default=0)
    evaluation = commands.add_parser("eval", help="write held-out GenEval-format evaluation prompts")
    evaluation.add_argument("--output", required=True)
    evaluation.add_argument("--per_tag", type=positive_int, default=50)
    evaluation.add_argument("--seed", type=nonnegative_int, default=0)
    args = parser.parse_args(argv)
    if args.command == "dataset":
        print(write_dataset(args.output_dir, args.num_images, args.resolution, args.seed, args.format,
                            args.caption_column))
    else:
        prompts = write_eval_metadata(args.output, args.per_tag, args.seed)
        print(f"wrote {len(prompts)} prompts to {args.output}")


if __name__ == "__main__":
    from common.cli import run

    run(main)
