"""Images per second of the GenEval scorer (evaluate_geneval.py's code path) on this machine.

    python script/bench_geneval_scoring.py [--images 16] [--resolution 512] [--detector_model DIR --clip_model DIR]

Without model paths it builds the tiny random Mask2Former and CLIP (evaluation.tiny_models): the numbers then measure
the pipeline (GenEval's 1333 x 800 test-time resize, per-query masks, the rules, CLIP colour crops), not the real
models' cost. Also times the toy world's analytic detector through the same rules engine.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    from common.cli import ArgumentParser, positive_int

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive_int, default=16)
    parser.add_argument("--resolution", type=positive_int, default=512, help="side of the scored images")
    parser.add_argument("--batch_size", type=positive_int, default=4)
    parser.add_argument("--detector_model", default=None)
    parser.add_argument("--clip_model", default=None)
    args = parser.parse_args(argv)

    import numpy as np

    from evaluation.detectors import Mask2FormerDetector
    from evaluation.geneval import write_prompt
    from evaluation.scoring import score_run
    from evaluation.tiny_models import build_tiny_clip, build_tiny_mask2former
    from toyworld import world
    from toyworld.detector import ShapeDetector

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        detector_model = args.detector_model or build_tiny_mask2former(tmp / "mask2former")
        clip_model = args.clip_model or build_tiny_clip(tmp / "clip")
        prompts = world.eval_metadata(num_prompts_per_tag=max(1, args.images // 12 + 1), seed=0)
        run = tmp / "run"
        for i in range(args.images // 2):  # two images per prompt, rendered at the scored resolution
            metadata = prompts[i % len(prompts)]
            rng = np.random.default_rng([5, i])
            write_prompt(run, i, metadata, [world.render(metadata, rng, args.resolution) for _ in range(2)])
        n = 2 * (args.images // 2)
        detectors = {"mask2former (tiny)" if not args.detector_model else "mask2former":
                     Mask2FormerDetector(str(detector_model), str(clip_model)), "toy (analytic)": ShapeDetector()}
        print(f"{n} images of {args.resolution} px, batch {args.batch_size}")
        for name, detector in detectors.items():
            start = time.perf_counter()
            summary = score_run(run, detector, tmp / f"{name.split()[0]}.jsonl", batch_size=args.batch_size,
                                progress=False)
            seconds = time.perf_counter() - start
            print(f"{name:<22} {n / seconds:8.2f} images/s  ({seconds:.1f} s; overall {summary['overall']:.3f})")


if __name__ == "__main__":
    from common.cli import run

    run(main)
