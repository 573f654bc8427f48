"""GenEval's rules on a GenEval-layout run folder (`<run>/<NNNNN>/metadata.jsonl` + `samples/<NNNN>.png`).

The rules are those of GenEval's evaluation/evaluate_images.py (`evaluate`, `relative_position`) and
summary_scores.py, with an exchangeable detector (default: the analytic `ShapeDetector`):

- Detections of a class are ranked by score (GenEval: by confidence). An include {class, count} takes the
  top `count` detections of that class and fails when there are fewer ("at least count").
- color: all of those taken objects must have the colour (GenEval classifies the colour of exactly these).
- position [relation, i]: every taken object must be in `relation` to every object taken by include i,
  which must itself have matched. `relative_position` is GenEval's: offsets between box centres, each axis
  shrunk by 0.1 x (sum of the two box sizes on that axis), direction normalised by the original offset
  length; "left of" needs the normalised x component < -0.5 (right of > 0.5, above y < -0.5, below > 0.5).
  So a purely horizontal centre offset must exceed 0.2 x (width A + width B): near ties fail.
- exclude {class, count}: fails when `count` or more of the class are detected. GenEval's counting prompts
  carry exclude {class, n + 1}, which with include {class, n} demands exactly n.
- Per-tag accuracy = fraction of correct images of that tag; overall = mean of the per-tag accuracies.

Not carried over: GenEval's detector confidence thresholds (0.3, and 0.9 for counting prompts) and its
16-objects-per-class cap; the analytic detector only returns blobs it accepts as shapes.

CLI: python -m toyworld.scorer RUN_DIR [--out scores.json] [--per_image results.jsonl]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from toyworld.detector import Detection, Detector, ShapeDetector

POSITION_THRESHOLD = 0.1


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The relations ("left of", "right of", "above", "below") of box A to box B, as GenEval computes them."""
    boxes = np.array([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)  # (box, corner, xy)
    centre_a, centre_b = boxes.mean(axis=1)
    size_a, size_b = boxes[:, 1] - boxes[:, 0]
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


def evaluate(detections: Sequence[Detection], metadata: dict,
             position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """(correct, reasons for failure) of one image's detections against its GenEval metadata."""
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: -d.score):
        by_class.setdefault(detection.class_name, []).append(detection)
    reasons: list[str] = []
    matched: list[Optional[list[Detection]]] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = by_class.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        elif "color" in req and sum(d.color == req["color"] for d in found) < count:
            ok = False
            reasons.append(f"expected {req['color']} {name}>={count}, found {[d.color for d in found]}")
        if ok and "position" in req:
            relation, target = req["position"]
            if matched[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                actual = [relative_position(obj.bbox, other.bbox, position_threshold)
                          for obj in found for other in matched[target]]
                wrong = [relations for relations in actual if relation not in relations]
                if wrong:
                    ok = False
                    reasons.append(f"expected {name} {relation} target, found "
                                   f"{' and '.join(sorted(wrong[0])) or 'no relation'}")
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        detected = len(by_class.get(req["class"], []))
        if detected >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {detected}")
    return not reasons, reasons


def iter_samples(run_dir: str | os.PathLike) -> Iterator[tuple[dict, Path]]:
    """(metadata, image path) of every sample in a GenEval-layout folder, in prompt then sample order."""
    for folder in sorted(Path(run_dir).iterdir()):
        if folder.is_dir() and folder.name.isdigit() and (folder / "metadata.jsonl").is_file():
            metadata = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
            for image_path in sorted((folder / "samples").glob("*.png")):
                yield metadata, image_path


def score_images(run_dir: str | os.PathLike, detector: Optional[Detector] = None) -> list[dict]:
    """Per-image results, with GenEval's results.jsonl fields (metadata and details as JSON strings)."""
    detector = detector or ShapeDetector()
    results = []
    for metadata, image_path in iter_samples(run_dir):
        with Image.open(image_path) as image:
            detections = detector.detect(image)
        correct, reasons = evaluate(detections, metadata)
        results.append({
            "filename": str(image_path), "tag": metadata["tag"], "prompt": metadata["prompt"],
            "correct": correct, "reason": "\n".join(reasons), "metadata": json.dumps(metadata),
            "details": json.dumps([d.to_dict() for d in detections]),
        })
    return results


def summarize(results: Sequence[dict]) -> dict:
    """{"overall": mean of per-tag accuracies, "categories": {tag: accuracy}, "num_images": n}."""
    by_tag: dict[str, list[bool]] = {}
    for result in results:
        by_tag.setdefault(result["tag"], []).append(result["correct"])
    categories = {tag: float(np.mean(values)) for tag, values in by_tag.items()}
    overall = float(np.mean(list(categories.values()))) if categories else 0.0
    return {"overall": overall, "categories": categories, "num_images": len(results)}


def score_folder(run_dir: str | os.PathLike, detector: Optional[Detector] = None,
                 per_image_path: str | os.PathLike | None = None) -> dict:
    """Score every image of a GenEval-layout folder; optionally write the per-image results as .jsonl."""
    results = score_images(run_dir, detector)
    if not results:
        from common.cli import UsageError

        raise UsageError(f"no GenEval prompt folders with samples under {run_dir}; pass a folder holding "
                         "<NNNNN>/metadata.jsonl and <NNNNN>/samples/*.png")
    if per_image_path is not None:
        Path(per_image_path).write_text("".join(json.dumps(result) + "\n" for result in results))
    return summarize(results)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: score a run folder, print and optionally save the summary."""
    from common.cli import ArgumentParser, require_dir

    parser = ArgumentParser(description="GenEval-rules scorer for the toy world.")
    parser.add_argument("run_dir", help="a GenEval-layout folder: <run_dir>/<NNNNN>/metadata.jsonl + samples/*.png")
    parser.add_argument("--out", default=None, help="write the summary JSON here")
    parser.add_argument("--per_image", default=None, help="write per-image results (.jsonl) here")
    args = parser.parse_args(argv)
    require_dir(args.run_dir, "run_dir")
    summary = score_folder(args.run_dir, per_image_path=args.per_image)
    for tag, accuracy in summary["categories"].items():
        print(f"{tag:<14} {accuracy:.4f}")
    print(f"{'overall':<14} {summary['overall']:.4f} ({summary['num_images']} images)")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    from common.cli import run

    run(main)
