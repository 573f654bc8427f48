"""GenEval's rules on toy-world images: the shared rules engine (evaluation.geneval_rules) with the analytic detector.

The rules are GenEval's (evaluation/geneval_rules.py: counts via include/exclude, colours of the top-`count`
objects, relative position with the 0.1 margin, per-tag means and their unweighted mean). The analytic
`ShapeDetector` declares no score thresholds: its scores are shape-fit IoUs and it returns only the blobs it accepts
as shapes, so GenEval's 0.3 / 0.9 confidence thresholds (made for Mask2Former's class x mask scores) do not apply.

CLI: python -m toyworld.scorer RUN_DIR [--out scores.json] [--per_image results.jsonl]
(or `python evaluate_geneval.py RUN_DIR --detector toy`, the same code with sharding and resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from evaluation.geneval_rules import evaluate as evaluate_kept
from evaluation.geneval_rules import iter_samples, keep_detections, relative_position, summarize  # noqa: F401
from toyworld.detector import Detection, ShapeDetector

POSITION_THRESHOLD = 0.1


def evaluate(detections: Sequence[Detection], metadata: dict,
             position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """(correct, reasons for failure) of one image's analytic detections against its GenEval metadata."""
    kept = keep_detections(detections, metadata.get("tag", ""), ShapeDetector.thresholds)
    return evaluate_kept(kept, metadata, lambda found, name: [d.color for d in found], position_threshold)


def score_folder(run_dir: str | os.PathLike, detector: Optional[ShapeDetector] = None,
                 per_image_path: str | os.PathLike | None = None) -> dict:
    """Score every image of a GenEval-layout folder; the per-image results (GenEval's results.jsonl fields) go
    to `per_image_path` (default: <run_dir>/results.jsonl). Returns the summary."""
    from evaluation.scoring import score_run

    outfile = Path(per_image_path) if per_image_path else Path(run_dir) / "results.jsonl"
    return score_run(run_dir, detector or ShapeDetector(), outfile, progress=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: score a run folder, print and optionally save the summary."""
    from common.cli import ArgumentParser, require_dir
    from evaluation.geneval_rules import format_summary

    parser = ArgumentParser(description="GenEval-rules scorer for the toy world.")
    parser.add_argument("run_dir", help="a GenEval-layout folder: <run_dir>/<NNNNN>/metadata.jsonl + samples/*.png")
    parser.add_argument("--out", default=None, help="write the summary JSON here")
    parser.add_argument("--per_image", default=None, help="write per-image results (.jsonl) here")
    args = parser.parse_args(argv)
    require_dir(args.run_dir, "run_dir")
    summary = score_folder(args.run_dir, per_image_path=args.per_image)
    print(format_summary(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    from common.cli import run

    run(main)
