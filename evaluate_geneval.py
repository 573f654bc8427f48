"""Score a GenEval-layout folder with GenEval's rules, in this project's own environment (no mmdet, no mmcv).

    python evaluate_geneval.py outputs/sid/GenEval_RESOLUTION512_NFE4_cfg3.5/images/global_steps5000
    torchrun --nproc_per_node 8 evaluate_geneval.py RUN_DIR      # images sharded across processes
    python evaluate_geneval.py RUN_DIR --detector toy            # toy-world folders: the analytic detector

RUN_DIR holds the numbered prompt folders (<NNNNN>/metadata.jsonl + samples/<NNNN>.png), ours or another
project's. The detector is Mask2Former (transformers; default facebook/mask2former-swin-small-coco-instance, converted
Detectron2 weights rather than mmdet's, so numbers can differ slightly from the official evaluator's) with CLIP
ViT-L/14 for colours; the rules and constants are GenEval's (evaluation/geneval_rules.py). Writes GenEval's
results.jsonl (default RUN_DIR/results.jsonl) and <name>_summary.json, and prints summary_scores.py's summary.
Resumable: a killed run continues with the images it had not scored.
"""

import json
import os

from common.cli import ArgumentParser, UsageError, positive_int, require_dir, run
from evaluation.detectors import DEFAULT_CLIP, DEFAULT_DETECTOR


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a GenEval-layout folder (<NNNNN>/metadata.jsonl + samples/*.png)")
    parser.add_argument("--outfile", default=None, help="results .jsonl (default: RUN_DIR/results.jsonl)")
    parser.add_argument("--detector", choices=["mask2former", "toy"], default="mask2former")
    parser.add_argument("--detector_model", default=DEFAULT_DETECTOR, help="hub id or local folder")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP, help="hub id or local folder")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per detector call")
    parser.add_argument("--test_scale", type=positive_int, nargs=2, default=[1333, 800], metavar=("LONG", "SHORT"),
                        help="the detector's test-time resize (GenEval: 1333 800, keeping the aspect ratio)")
    parser.add_argument("--resize", choices=["cv2", "pil"], default="cv2",
                        help="the detector's test-time resize: cv2 bilinear without antialiasing (GenEval's mmcv) or PIL")
    parser.add_argument("--clip_preprocess", choices=["open_clip", "transformers"], default="open_clip",
                        help="CLIP's crop preprocessing: open_clip's (GenEval's) or transformers' CLIPImageProcessor")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                        help="detector and CLIP weights dtype (GenEval's evaluator runs fp32)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    require_dir(args.run_dir, "run_dir", "pass the folder that holds the numbered prompt folders")
    from evaluation.geneval_rules import is_geneval_run

    if not is_geneval_run(args.run_dir):  # before any model is loaded
        raise UsageError(f"{args.run_dir} is not a GenEval-layout folder (no <NNNNN>/metadata.jsonl with "
                         "samples/*.png); pass the folder that holds the numbered prompt folders")
    import torch

    from evaluation.detectors import load_detector
    from evaluation.geneval import Shard
    from evaluation.geneval_rules import format_summary
    from evaluation.scoring import score_run

    shard = Shard.from_env()
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    detector = load_detector(args.detector, args.detector_model, args.clip_model, device, dtype,
                             tuple(args.test_scale), args.resize, args.clip_preprocess)
    summary = score_run(args.run_dir, detector, args.outfile, shard, args.batch_size)
    if summary is None:
        print(f"[rank {shard.rank}] done; the last process to finish writes the summary")
        return None
    print(format_summary(summary))
    print(json.dumps({"overall": summary["overall"], **summary["categories"]}))
    return summary


if __name__ == "__main__":
    run(main)
