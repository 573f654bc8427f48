"""Learning curves in the toy world: each student's 1/2/4-step score at training lengths on a log scale.

    python script/toy_curves.py [--output_dir outputs/toy_curves] [--students scm meanflow sid kd]

Each student is trained once, for `CURVE_MULTIPLES[-1]` times the steps it reaches in 8 minutes
(`STEPS_8_MINUTES`: a step count, not wall time, so the points are the same on any CPU), with a checkpoint at
every multiple; every checkpoint's export is sampled and scored on the validation prompts (eval seed 1, never the
held-out ones), beside the teacher's rows on the same prompts. Everything else (teacher, data, recipes, sampling,
scoring) is script/toy_benchmark.py's. Resumable: a student whose run stopped continues from its last checkpoint;
sampled rows are reused.
Writes <output_dir>/curves.json, curves.md and curves.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "script"))

import toy_benchmark as tb  # noqa: E402

# steps each student reaches in 8 minutes (two students at a time, one thread each), measured on the validation
# runs of 2026-12-06 (Intel Xeon, 2 cores): sCM 1044, MeanFlow 880-885, SiD 1126 (batch 16, 4 generator steps),
# the ceiling 3025 (one forward and backward per step, no teacher)
STEPS_8_MINUTES = {"scm": 1000, "meanflow": 900, "sid": 1100, "kd": 3000}
CURVE_MULTIPLES = (0.5, 1, 2, 4)  # of the 8-minute steps: 4, 8, 16 and 32 minutes' worth
VALIDATION_SEED, VALIDATION_PER_TAG, IMAGES_PER_PROMPT = 1, 64, 2


def curve_steps(name: str) -> list[int]:
    return [round(STEPS_8_MINUTES[name] * m) for m in CURVE_MULTIPLES]


def train_args(name, run, teacher, rescaled, data, preset, guidance) -> list[str]:
    args = tb.student_args(name, 0, run, teacher, rescaled, data, {**preset, "minutes": None,
                                                                   "steps": curve_steps(name)[-1]}, guidance)
    return args + ["--checkpointing_steps", str(curve_steps(name)[0]), "--resume_from_checkpoint", "latest"]


def plot(curves: dict, teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfes = (1, 2, 4)
    fig, axes = plt.subplots(1, len(nfes), figsize=(5 * len(nfes), 4), sharey=True)
    for ax, nfe in zip(axes, nfes):
        for i, (name, rows) in enumerate(curves.items()):
            pts = sorted((r["train_steps"], r["overall"], r["ci95"]) for r in rows if r["nfe"] == nfe)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=name, color=f"C{i}")
        if ("euler", nfe) in teacher:
            ax.axhline(teacher[("euler", nfe)], color="k", ls=":", label=f"teacher Euler {nfe} step(s)")
        if ("euler", 28) in teacher:
            ax.axhline(teacher[("euler", 28)], color="k", ls="-", label="teacher 28 steps")
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title(f"{nfe} step(s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GenEval overall (validation prompts)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    from common.cli import ArgumentParser, positive_int
    from evaluation.geneval import load_prompts

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "toy_curves"))
    parser.add_argument("--students", nargs="+", choices=list(STEPS_8_MINUTES), default=list(STEPS_8_MINUTES))
    parser.add_argument("--jobs", type=positive_int, default=2)
    parser.add_argument("--guidance_scale", type=float, default=3.5)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset = dict(tb.PRESETS["full"], eval_per_tag=VALIDATION_PER_TAG, images_per_prompt=IMAGES_PER_PROMPT)
    teacher = tb.SHIPPED_TEACHER
    built = json.loads((teacher / tb.TEACHER_SUMMARY).read_text())["config"]
    preset.update(resolution=built["resolution"], max_sequence_length=built["max_sequence_length"])
    data, eval_file = tb.stage_data(out, preset, 0, VALIDATION_SEED)
    rescaled = tb.stage_rescale(out, teacher, data, preset, False)
    if "kd" in args.students:
        tb.stage_pairs(out, teacher, data, args.guidance_scale)
    jobs = []
    for name in args.students:
        run = out / "students" / name
        jobs.append((tb.STUDENTS[name][0], train_args(name, run, teacher, rescaled, data, preset, args.guidance_scale),
                     run / "transformer"))
    tb._train_jobs(jobs, args.jobs)

    prompts = load_prompts(metadata_file=eval_file)
    results_file = out / "curves.json"
    done = json.loads(results_file.read_text()) if results_file.exists() else {"rows": []}
    have = {(r["model"], r["nfe"], r.get("train_steps")) for r in done["rows"]}
    rows = list(done["rows"])
    plan = [("teacher", "euler", n, None, None) for n in (28, 1, 2, 4)]
    for name in args.students:
        for steps in curve_steps(name):
            plan += [(name, tb.STUDENTS[name][1], n, out / "students" / name / f"checkpoint-{steps}" / "transformer",
                      steps) for n in (1, 2, 4)]
    for model, sampler, nfe, weights, steps in plan:
        if (model, nfe, steps) in have:
            continue
        pipe = tb.load_pipeline(sampler if model != "teacher" else "teacher", teacher, weights)
        run = out / "samples" / f"{model}_steps{steps}_nfe{nfe}"
        summary = tb.sample_and_score(pipe, prompts, run, nfe, preset, args.guidance_scale)
        trained = None
        if weights is not None:
            state = json.loads((weights.parent / "trainer_state.json").read_text())
            trained = round(state.get("train_seconds", 0) / 60, 2)
        rows.append({"model": model, "sampler": sampler, "nfe": nfe, "train_steps": steps, "train_minutes": trained,
                     "overall": summary["overall"], "ci95": 1.96 * summary["overall_se"],
                     "categories": summary["categories"]})
        results_file.write_text(json.dumps({"rows": rows}, indent=1))
        tb.log(f"{model} steps {steps} ({sampler}, {nfe} steps): overall {summary['overall']:.3f}")

    teacher_rows = {("euler", r["nfe"]): r["overall"] for r in rows if r["model"] == "teacher"}
    curves = {name: [r for r in rows if r["model"] == name] for name in args.students}
    lines = ["| student | steps | train min | NFE 1 | NFE 2 | NFE 4 |", "|---|---|---|---|---|---|"]
    for name, rs in curves.items():
        for steps in curve_steps(name):
            by = {r["nfe"]: r for r in rs if r["train_steps"] == steps}
            if by:
                lines.append(f"| {name} | {steps} | {next(iter(by.values()))['train_minutes']} | "
                             + " | ".join(f"{by[n]['overall']:.3f} +-{by[n]['ci95']:.3f}" if n in by else ""
                                          for n in (1, 2, 4)) + " |")
    lines.append("")
    lines.append("Teacher on the same prompts: " + ", ".join(f"Euler {n}: {teacher_rows[('euler', n)]:.3f}"
                                                          for n in (1, 2, 4, 28) if ("euler", n) in teacher_rows))
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    plot(curves, teacher_rows, out / "curves.png")
    result = {"rows": rows, "steps_8_minutes": STEPS_8_MINUTES, "multiples": CURVE_MULTIPLES,
              "validation": {"eval_seed": VALIDATION_SEED, "per_tag": VALIDATION_PER_TAG,
                             "images_per_prompt": IMAGES_PER_PROMPT},
              "seconds": round(time.perf_counter() - start)}
    results_file.write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    from common.cli import run

    run(main)
