"""Ship a built toy teacher into the repository: its pipeline folder plus the rescaled x1 twin.

    python -m toyworld.teacher --output_dir outputs/toy_teacher          # the build (hours; resumable)
    python script/ship_toy_teacher.py --teacher_dir outputs/toy_teacher  # -> toyworld/toy_teacher

The twin is made by train_rescale.py on world data at the teacher's resolution (the same stage as the toy
benchmark's --rescale) and saved as a diffusers transformer folder `transformer_x1/` inside the shipped folder,
so both load through the project's normal loaders. The build's checkpoints and snapshots are not shipped. The
result must fit in --max_megabytes (the repository's 50 MB budget); the old shipped folder is replaced only once
the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "script"))

import toy_benchmark  # noqa: E402

PIPELINE_PARTS = toy_benchmark.FINISHED_TEACHER_PARTS
DEFAULT_WORK = ROOT / "outputs" / "ship_toy_teacher"


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def ship(teacher: Path, dest: Path, work: Path | None, rescale_steps: int, data_images: int, batch: int,
         max_megabytes: float, force: bool = False) -> Path:
    from common.cli import UsageError

    toy_benchmark.check_teacher_dir(teacher)
    if dest.exists() and not force:
        raise UsageError(f"{dest} already exists; pass --force to replace it")
    built = json.loads((teacher / toy_benchmark.TEACHER_SUMMARY).read_text())
    config = built["config"]
    preset = {"resolution": config["resolution"], "max_sequence_length": config["max_sequence_length"],
              "data_images": data_images, "eval_per_tag": 1, "batch": batch, "rescale_steps": rescale_steps}
    digest = toy_benchmark.teacher_digest(teacher)
    # one folder per teacher and settings: a rebuilt teacher never reuses a stale twin
    work = work or DEFAULT_WORK / f"{digest[:16]}-{rescale_steps}-{data_images}-{batch}"
    twin_command = toy_benchmark.rescale_args(Path("<work>"), Path("<teacher>"), Path("<data>"), preset)
    settings = hashlib.sha256(repr(twin_command).encode()).hexdigest()  # the twin's command line in this code
    toy_benchmark.claim_run_dir(work, {"teacher": digest, "rescale_steps": rescale_steps, "data_images": data_images,
                                       "batch": batch, "settings": settings}, "--work_dir")
    start = time.perf_counter()
    data, _ = toy_benchmark.stage_data(work, preset, seed=0)
    toy_benchmark.stage_rescale(work, teacher, data, preset, rescale=True)
    twin = work / "rescale" / "transformer"
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for part in PIPELINE_PARTS:
        src = teacher / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, staging / part)
    shutil.copytree(twin, staging / toy_benchmark.SHIPPED_X1)
    built["x1_twin"] = {"made_by": "train_rescale.py", "steps": rescale_steps, "batch": batch,
                        "data_images": data_images, "seconds": time.perf_counter() - start,
                        "evaluation": json.loads((work / "rescale" / "rescale_eval.json").read_text())}
    (staging / toy_benchmark.TEACHER_SUMMARY).write_text(json.dumps(built, indent=1))
    size = folder_megabytes(staging)
    if size > max_megabytes:
        shutil.rmtree(staging)
        raise UsageError(f"the shipped teacher would take {size:.1f} MB, over --max_megabytes {max_megabytes:g}; "
                         "build a smaller teacher")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    toy_benchmark.log(f"shipped {teacher} to {dest} ({size:.1f} MB, x1 twin in {dest / toy_benchmark.SHIPPED_X1})")
    return dest


def main(argv=None) -> Path:
    from common.cli import ArgumentParser, positive_float, positive_int

    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--teacher_dir", required=True, help="a finished build of python -m toyworld.teacher")
    parser.add_argument("--dest", default=str(toy_benchmark.SHIPPED_TEACHER))
    parser.add_argument("--work_dir", default=None,
                        help="world data and the rescale run, reused when present (default: outputs/ship_toy_teacher/"
                             "<the first 16 hex digits of the teacher's content hash>-<steps>-<images>-<batch>)")
    parser.add_argument("--rescale_steps", type=positive_int, default=1000)
    parser.add_argument("--data_images", type=positive_int, default=6000)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--max_megabytes", type=positive_float, default=50.0)
    parser.add_argument("--force", action="store_true", help="replace an existing shipped teacher")
    args = parser.parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else None
    return ship(Path(args.teacher_dir), Path(args.dest), work, args.rescale_steps, args.data_images, args.batch,
                args.max_megabytes, args.force)


if __name__ == "__main__":
    from common.cli import run

    run(main)
