"""Scoring a GenEval-layout folder with GenEval's rules: batched, sharded across processes, resumable.

Each process scores samples rank, rank + W, ... of the folder (in sorted order) and appends one results line per
image to its own part file `.<outfile>.part<rank>-of-<W>` as each batch finishes, so a killed run continues where
it stopped (the lines already written are skipped, whatever W was). Whichever process finds every sample scored
merges the parts into `<outfile>` (GenEval's results.jsonl, in sample order; the parts are then removed) and writes
`<outfile stem>_summary.json`. Rerunning over a finished folder scores nothing and rewrites the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from common.cli import UsageError

from .geneval import Shard
from .geneval_rules import Detector, format_summary, is_geneval_run, iter_samples, judge, result_record, summarize


def part_files(outfile: Path) -> list[Path]:
    return sorted(outfile.parent.glob(f".{outfile.name}.part*"))


def scored_files(outfile: Path) -> list[Path]:
    """Where finished results live: the merged results file (an earlier complete run) and the part files."""
    return ([outfile] if outfile.is_file() else []) + part_files(outfile)


def read_results(files: list[Path]) -> dict[str, dict]:
    """filename -> result of every complete line in `files` (a line cut by a kill is ignored)."""
    done = {}
    for path in files:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["filename"]] = record
    return done


def summary_path(outfile: Path) -> Path:
    return outfile.with_name(f"{outfile.stem}_summary.json")


def score_run(run_dir: str | os.PathLike, detector: Detector, outfile: str | os.PathLike | None = None,
              shard: Shard | None = None, batch_size: int = 8, progress: bool = True) -> dict | None:
    """Score this shard of `run_dir`; returns the summary when every sample is scored (else None)."""
    from PIL import Image, ImageOps

    run_dir = Path(run_dir)
    if not is_geneval_run(run_dir):
        raise UsageError(f"{run_dir} is not a GenEval-layout folder (no <NNNNN>/metadata.jsonl with samples/*.png); "
                         "pass the folder that holds the numbered prompt folders, e.g. .../images/global_steps0")
    shard = shard or Shard()
    outfile = Path(outfile) if outfile else run_dir / "results.jsonl"
    samples = list(iter_samples(run_dir))
    if not samples:
        raise UsageError(f"{run_dir} holds prompt folders but no samples/<NNNN>.png images")
    done = read_results(scored_files(outfile))
    todo = [(m, p) for m, p in samples[shard.rank::shard.world_size] if str(p) not in done]
    part = outfile.with_name(f".{outfile.name}.part{shard.rank}-of-{shard.world_size}")
    if part.exists() and not part.read_bytes().endswith(b"\n") and part.stat().st_size:  # a line cut by a kill
        data = part.read_bytes()
        part.write_bytes(data[:data.rfind(b"\n") + 1])
    bar = tqdm(total=len(todo), desc=f"GenEval scoring rank {shard.rank}", unit="image", disable=not progress)
    with part.open("a") as sink:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images = []
            for _, path in batch:
                with Image.open(path) as image:
                    images.append(ImageOps.exif_transpose(image).convert("RGB"))
            for (metadata, path), image, detections in zip(batch, images, detector.detect_batch(images)):
                correct, reasons, kept = judge(image, detections, metadata, detector)
                sink.write(json.dumps(result_record(path, metadata, correct, reasons, kept)) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(batch))
    bar.close()
    done = read_results(scored_files(outfile))
    if any(str(p) not in done for _, p in samples):
        return None  # other shards are still running; the last one to finish merges
    results = [done[str(p)] for _, p in samples]
    tmp = outfile.with_name(f".{outfile.name}.merge{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
    os.replace(tmp, outfile)
    for path in part_files(outfile):
        path.unlink(missing_ok=True)
    summary = {**summarize(results), "detector": detector.name, "run_dir": str(run_dir)}
    summary_path(outfile).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


__all__ = ["format_summary", "read_results", "score_run", "summary_path"]
