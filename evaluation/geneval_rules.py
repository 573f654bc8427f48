"""GenEval's scoring rules (METHODS 5.5; djghosh13/geneval evaluation/evaluate_images.py and summary_scores.py),
behind an exchangeable detector: the toy world's analytic detector or Mask2Former + CLIP (evaluation.detectors).

- Kept detections: per class, sorted by score, score > 0.3 (> 0.9 for every class in `counting` prompts), at most
  16 per class, no NMS. A detector declares its own thresholds: GenEval's for Mask2Former, none for the analytic
  detector (its scores are shape-fit IoUs and it returns only the blobs it accepts as shapes).
- include {class, count}: the top `count` kept detections of the class, failing when there are fewer ("at least");
  colour: the detector classifies those objects' colours among GenEval's ten, and `count` of them must match;
  position [relation, i]: each of those objects must hold `relation` against every object matched by include i,
  which must itself have matched. exclude {class, count}: fails when `count` or more are kept (exact counts).
- relative_position: centre offset between the boxes, shrunk per axis by 0.1 x (size A + size B); nothing left means
  no relation; else the offset over its raw length is compared with +-0.5.
- An image is correct when every clause holds; a tag's score is its mean over images; overall = unweighted mean of
  the tags. results.jsonl carries GenEval's fields; `summary` is summary_scores.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAG_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class DetectionLike(Protocol):
    """What the rules read of a detection: class name, confidence and box (x0, y0, x1, y1) in pixels."""

    class_name: str
    score: float
    bbox: Sequence[float]


class Detector(Protocol):
    """A detector the rules can use. `thresholds` = (score threshold, counting-prompt threshold)."""

    name: str
    thresholds: tuple[float, float]

    def detect_batch(self, images: list) -> list[list[DetectionLike]]:
        """Detections of each image (any order)."""
        ...

    def classify_colors(self, image, detections: list[DetectionLike], class_name: str) -> list[str]:
        """The colour (one of COLORS, or the detector's palette) of each detection of `class_name`."""
        ...


def keep_detections(detections: Sequence[DetectionLike], tag: str, thresholds: tuple[float, float] = (
        THRESHOLD, COUNTING_THRESHOLD), max_objects: int = MAX_OBJECTS) -> dict[str, list[DetectionLike]]:
    """GenEval's selection: per class, by descending score, score > threshold, at most `max_objects`, no NMS."""
    threshold = thresholds[1] if tag == "counting" else thresholds[0]
    by_class: dict[str, list[DetectionLike]] = {}
    for detection in sorted(detections, key=lambda d: -d.score):
        if detection.score > threshold and len(by_class.get(detection.class_name, [])) < max_objects:
            by_class.setdefault(detection.class_name, []).append(detection)
    return by_class


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The relations ("left of", "right of", "above", "below") of box A to box B, as GenEval computes them."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)  # (box, corner, xy)
    centre_a, centre_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(detected: dict[str, list[DetectionLike]], metadata: dict,
             colors_of: Callable[[list[DetectionLike], str], list[str]],
             position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """(correct, reasons for failure) of one image's kept detections against its GenEval metadata."""
    reasons: list[str] = []
    matched: list[Optional[list[DetectionLike]]] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = detected.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = colors_of(found, name)
                if colors.count(req["color"]) < count:
                    ok = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and " + ", ".join(f"{colors.count(c)} {c}" for c in
                                                                       (*COLORS, *sorted(set(colors) - set(COLORS)))
                                                                       if c in colors))
            if ok and "position" in req:
                relation, target = req["position"]
                if matched[target] is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        wrong = next((rels for rels in (relative_position(obj.bbox, other.bbox, position_threshold)
                                                        for other in matched[target]) if relation not in rels), None)
                        if wrong is not None:
                            ok = False
                            reasons.append(f"expected {name} {relation} target, found "
                                           f"{' and '.join(sorted(wrong)) or 'no relation'}")
                            break
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        kept = len(detected.get(req["class"], []))
        if kept >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {kept}")
    return not reasons, reasons


def judge(image, detections: Sequence[DetectionLike], metadata: dict, detector: Detector) -> tuple[bool, list[str],
                                                                                                 dict]:
    """Keep `detections` by the detector's thresholds and evaluate them: (correct, reasons, kept by class)."""
    kept = keep_detections(detections, metadata.get("tag", ""), detector.thresholds)
    correct, reasons = evaluate(kept, metadata, lambda found, name: detector.classify_colors(image, found, name))
    return correct, reasons, kept


# ----- GenEval-layout folders, results.jsonl, summary -----
def is_geneval_run(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() and (p / "metadata.jsonl").is_file()
                                   for p in folder.iterdir())


def iter_samples(run_dir: str | os.PathLike) -> Iterator[tuple[dict, Path]]:
    """(metadata, image path) of every sample in a GenEval-layout folder, in prompt then sample order."""
    for folder in sorted(Path(run_dir).iterdir()):
        if folder.is_dir() and folder.name.isdigit() and (folder / "metadata.jsonl").is_file():
            metadata = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
            for image_path in sorted((folder / "samples").glob("*.png")):
                if image_path.stem.isdigit():
                    yield metadata, image_path


def result_record(image_path: Path, metadata: dict, correct: bool, reasons: list[str], kept: dict) -> dict:
    """One line of results.jsonl, with GenEval's fields (metadata and details as JSON strings)."""
    details = {name: [[*map(float, d.bbox[:4]), float(d.score)] for d in found] for name, found in kept.items()}
    return {"filename": str(image_path), "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct),
            "reason": "\n".join(reasons), "metadata": json.dumps(metadata), "details": json.dumps(details)}


def summarize(results: Sequence[dict]) -> dict:
    """summary_scores.py: images, prompts, % correct images and prompts, per-tag accuracy, overall = tag mean."""
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for result in results:
        by_tag.setdefault(result["tag"], []).append(bool(result["correct"]))
        by_prompt.setdefault(result["metadata"], []).append(bool(result["correct"]))
    order = [t for t in TAG_ORDER if t in by_tag] + [t for t in by_tag if t not in TAG_ORDER]
    categories = {tag: float(np.mean(by_tag[tag])) for tag in order}
    return {
        "overall": float(np.mean(list(categories.values()))) if categories else 0.0,
        "categories": categories,
        "counts": {tag: [int(sum(by_tag[tag])), len(by_tag[tag])] for tag in order},
        "num_images": len(results),
        "num_prompts": len(by_prompt),
        "correct_images": float(np.mean([bool(r["correct"]) for r in results])) if results else 0.0,
        "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()])) if by_prompt else 0.0,
    }


def format_summary(summary: dict) -> str:
    lines = ["Summary", "=======", f"Total images: {summary['num_images']}",
             f"Total prompts: {summary['num_prompts']}", f"% correct images: {summary['correct_images']:.2%}",
             f"% correct prompts: {summary['correct_prompts']:.2%}", "", "Task breakdown", "=============="]
    for tag, score in summary["categories"].items():
        correct, total = summary["counts"][tag]
        lines.append(f"{tag:<16} = {score:.2%} ({correct} / {total})")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)
