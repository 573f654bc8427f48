"""The paper's workflow end to end in the toy world, scored with GenEval's rules: a measured proof on a CPU.

    python script/toy_benchmark.py [--mode full|quick|smoke] [--output_dir outputs/toy_benchmark]

Stages (each reused when its output exists, so an interrupted run continues and --quick reuses --full's):
  1. toy teacher: a small FLUX pipeline (x1000 time/guidance, 16-channel VAE, CLIP + T5) trained on the world
  2. world data at the teacher's resolution: a training set (parquet) and held-out GenEval-format prompts
  3. rescale: train_rescale.py makes the x1 teacher
  4. distil: train_sCM.py and train_meanflow.py from the rescaled teacher
  5. sample the held-out prompts (4 images each): the teacher at 28 steps and with its own Euler sampler at
     1, 2 and 4 steps, the x1 teacher at 28 steps, each student at 1, 2 and 4 steps
  6. score with toyworld.scorer (GenEval's rules) and write results.json, results.md and image grids
Every stage uses the same scripts, loaders and pipelines as a FLUX.1-lite-8B run; only sizes differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from toyworld.teacher import PRESETS as TEACHER_PRESETS  # noqa: E402

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

PRESETS = {
    "full": dict(teacher=TEACHER_PRESETS["full"], data_images=6000, eval_per_tag=50, batch=32, rescale_steps=1000,
                 scm_steps=1500, meanflow_steps=1500, lr=2e-4),
    # quick: a demo that fits 10 minutes from a fresh clone (setup included); its teacher is far weaker than full's
    "quick": dict(teacher=TEACHER_PRESETS["quick"],
                  data_images=3000, eval_per_tag=8, batch=16, rescale_steps=80, scm_steps=120,
                  meanflow_steps=120, lr=1e-4, chance_per_tag=150),
    "smoke": dict(teacher=TEACHER_PRESETS["smoke"],
                  data_images=24, eval_per_tag=1, batch=4, rescale_steps=2, scm_steps=2, meanflow_steps=2, lr=1e-4,
                  nfes=(1,), teacher_steps=2, chance_per_tag=10),
}
# the paper's bars, as fractions of the teacher's overall score (issue 6)
BARS = {("scm", 2): 0.97, ("scm", 1): 0.90, ("meanflow", 4): 0.97, ("meanflow", 1): 0.70}


def log(msg: str) -> None:
    print(f"[toy-benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def stage_data(out: Path, preset: dict, seed: int) -> tuple[Path, Path]:
    from toyworld.world import write_dataset, write_eval_metadata

    data = out / "data" / "train.parquet"
    if not data.exists():
        write_dataset(out / "data", preset["data_images"], preset["resolution"], seed, format="parquet")
    eval_file = out / "eval_metadata.jsonl"
    if not eval_file.exists():
        write_eval_metadata(eval_file, preset["eval_per_tag"], seed)
    return data, eval_file


def stage_teacher(out: Path, preset: dict, seed: int, reuse: Path | None) -> Path:
    from toyworld.teacher import build_toy_teacher

    for candidate in ([reuse] if reuse else []) + [out / "teacher"]:
        if (candidate / "toy_teacher.json").exists():
            log(f"reusing the toy teacher in {candidate}")
            return candidate
    return build_toy_teacher(out / "teacher", replace(preset["teacher"], seed=seed), log=log)


def _train(module_name: str, argv: list[str], done: Path) -> Path:
    if done.exists():
        log(f"reusing {done}")
        return done
    module = __import__(module_name)
    reset_accelerate()
    try:
        module.main(argv)
    finally:
        reset_accelerate()
    return done


def common_train_args(teacher: Path, data: Path, out: Path, preset: dict, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(teacher), "--data_files", str(data),
            "--resolution", str(preset["resolution"]), "--train_batch_size", str(preset["batch"]),
            "--max_sequence_length", str(preset["max_sequence_length"]), "--dataloader_num_workers", "0",
            "--output_dir", str(out), "--max_train_steps", str(steps), "--checkpointing_steps", str(max(steps // 2, 1)),
            "--checkpoints_total_limit", "1", "--report_to", "tensorboard", "--seed", "0",
            "--resume_from_checkpoint", "latest", "--lr_warmup_steps", str(min(50, steps // 4))]


def stage_distill(out: Path, teacher: Path, data: Path, preset: dict, guidance: float) -> dict[str, Path]:
    """Rescale, then distil; students learn the teacher at the guidance they are evaluated at (METHODS 8, 18)."""
    lr = str(preset["lr"])
    rescaled = _train("train_rescale", common_train_args(teacher, data, out / "rescale", preset,
                                                         preset["rescale_steps"])
                      + ["--learning_rate", "3e-4", "--init", "remap", "--eval_steps", "8", "--eval_batches", "1"],
                      out / "rescale" / "rescaled.pt")
    base = ["--rescaled_checkpoint_path", str(rescaled), "--learning_rate", lr]
    scm = _train("train_sCM", common_train_args(teacher, data, out / "scm", preset, preset["scm_steps"]) + base
                 + ["--logit_mean", "0.2", "--logit_std", "1.6",
                    "--tangent_warmup_steps", str(max(preset["scm_steps"] // 4, 1)),
                    "--scm_cfg_scale", str(guidance)],
                 out / "scm" / "transformer")
    meanflow = _train("train_meanflow", common_train_args(teacher, data, out / "meanflow", preset,
                                                          preset["meanflow_steps"]) + base
                      + ["--zero_init_dual", "--use_cfg_meanflow", "True", "--cfg_kappa", "0.5",
                         "--cfg_scale", str(guidance)],
                      out / "meanflow" / "transformer")
    return {"rescaled": rescaled, "scm": scm, "meanflow": meanflow}


def pipelines(teacher: Path, trained: dict[str, Path]):
    """(model name, sampler, pipeline) for every row, loaded through the project's loaders."""
    from model.loading import load_transformer
    from model.pipeline import FluxEulerPipeline, FluxMeanFlowPipeline, FluxSCMPipeline

    def pipe(cls, transformer):
        p = cls.from_pretrained(teacher, transformer=transformer)
        p.set_progress_bar_config(disable=True)
        return p

    return {
        "teacher": pipe(FluxEulerPipeline, load_transformer(str(teacher))),
        "teacher_x1": pipe(FluxEulerPipeline, load_transformer(str(teacher), weights_path=trained["rescaled"],
                                                               time_input_scale=1.0)),
        "scm": pipe(FluxSCMPipeline, load_transformer(str(teacher), weights_path=trained["scm"],
                                                      time_input_scale=1.0)),
        "meanflow": pipe(FluxMeanFlowPipeline, load_transformer(str(teacher), weights_path=trained["meanflow"],
                                                                time_input_scale=1.0, dual_timestep=True)),
    }


def sample_and_score(pipe, prompts: list[dict], run: Path, nfe: int, preset: dict, guidance: float) -> dict:
    from evaluation.geneval import generate_geneval
    from toyworld.scorer import score_folder

    resolution = preset["resolution"]

    def generate(texts, generators):
        return pipe(prompt=texts, height=resolution, width=resolution, num_inference_steps=nfe,
                    guidance_scale=guidance, num_images_per_prompt=4, generator=generators,
                    max_sequence_length=preset["max_sequence_length"], transformer_batch_size=4).images

    start = time.perf_counter()
    written, _ = generate_geneval(generate, prompts, run, 4, batch_size=8, seed=42,
                                  config={"nfe": nfe, "guidance": guidance})
    seconds = time.perf_counter() - start
    timing = run / "timing.json"
    if written:
        timing.write_text(json.dumps({"sec_per_image": seconds / (4 * written)}))
    summary = score_folder(run, per_image_path=run.parent / f"{run.name}_results.jsonl")
    summary["sec_per_image"] = json.loads(timing.read_text())["sec_per_image"] if timing.exists() else None
    return summary


def save_grid(run: Path, path: Path, prompts: int = 8) -> None:
    from PIL import Image

    folders = sorted(p for p in run.iterdir() if p.is_dir())[:prompts]
    images = [[Image.open(f / "samples" / f"{j:04d}.png").convert("RGB") for j in range(4)] for f in folders]
    w, h = images[0][0].size
    grid = Image.new("RGB", (4 * w, len(images) * h), "white")
    for i, row in enumerate(images):
        for j, image in enumerate(row):
            grid.paste(image, (j * w, i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def chance_levels(per_tag: int = 300, seed: int = 0, resolution: int = 64) -> dict[str, float]:
    """How often a clean image made for one prompt of a tag passes another random prompt of that tag."""
    from toyworld.scorer import evaluate
    from toyworld.world import render, sample_metadata

    detector = __import__("toyworld.detector", fromlist=["ShapeDetector"]).ShapeDetector()
    rng = np.random.default_rng([7, seed])
    levels = {}
    for tag in TAGS:
        hits = 0
        for _ in range(per_tag):
            image = render(sample_metadata(tag, rng), rng, resolution)
            hits += bool(evaluate(detector.detect(image), sample_metadata(tag, rng))[0])
        levels[tag] = hits / per_tag
    return levels


def write_report(out: Path, rows: list[dict], chance: dict[str, float], mode: str,
                 seconds: dict[str, float] | None = None) -> str:
    """results.md and results.json; `seconds` is this run's wall time per stage (reused stages count ~0)."""
    teacher = next(r for r in rows if r["model"] == "teacher" and r["nfe"] == max(r2["nfe"] for r2 in rows
                                                                                   if r2["model"] == "teacher"))
    lines = [f"# Toy-world distillation benchmark ({mode})", ""]
    if mode != "full":
        lines += [f"{mode} mode checks the workflow end to end with short training and few prompts (and, unless a full "
                  "run's teacher is reused, a far weaker teacher): its scores and bars are not the benchmark's "
                  "(README, 'Toy world').", ""]
    lines += ["| model | sampler | NFE | overall | " + " | ".join(TAGS) + " | vs teacher | s/image |",
              "|---|---|---|---|" + "---|" * len(TAGS) + "---|---|"]
    for r in rows:
        cats = " | ".join(f"{r['categories'].get(t, float('nan')):.3f}" for t in TAGS)
        frac = r["overall"] / teacher["overall"] if teacher["overall"] else float("nan")
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['overall']:.3f} | {cats} | {frac:.2f} | "
                     f"{r['sec_per_image'] or float('nan'):.4f} |")
    lines += ["", "Chance level per category (a clean image for another prompt of the tag): "
              + ", ".join(f"{t} {v:.3f}" for t, v in chance.items()), "", "Bars (issue 6):"]
    ok = teacher["overall"] >= 0.6 and all(teacher["categories"][t] >= 2 * chance[t] for t in TAGS)
    lines.append(f"- teacher {teacher['nfe']} steps: overall {teacher['overall']:.3f} >= 0.6 and every category "
                 f">= 2x chance: {'PASS' if ok else 'MISS'}")
    for (model, nfe), bar in BARS.items():
        row = next((r for r in rows if r["model"] == model and r["nfe"] == nfe), None)
        if row:
            frac = row["overall"] / teacher["overall"] if teacher["overall"] else 0.0
            lines.append(f"- {model} {nfe} step(s): {frac:.2f} of the teacher (bar {bar}): "
                         f"{'PASS' if frac >= bar else 'MISS'}")
    for r in rows:
        if r["model"] in ("scm", "meanflow"):
            euler = next((e for e in rows if e["model"] == "teacher" and e["nfe"] == r["nfe"]), None)
            if euler:
                beat = r["overall"] > euler["overall"]
                lines.append(f"- {r['model']} {r['nfe']} step(s) beats the teacher's Euler at {r['nfe']}: "
                             f"{r['overall']:.3f} vs {euler['overall']:.3f}: {'PASS' if beat else 'MISS'}")
    if seconds:
        lines += ["", "Wall time of this run (reused stages take ~0 s): "
                  + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"mode": mode, "rows": rows, "chance": chance,
                                                  "seconds": seconds or {}}, indent=1))
    return text


def main(argv=None) -> dict:
    from common.cli import ArgumentParser, UsageError, nonnegative_float, nonnegative_int

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(PRESETS), default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--teacher_dir", default=None, help="reuse this toy teacher (default: a full run's)")
    parser.add_argument("--guidance_scale", type=nonnegative_float, default=3.5)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    args = parser.parse_args(argv)
    if args.teacher_dir and not (Path(args.teacher_dir) / "toy_teacher.json").exists():
        raise UsageError(f"--teacher_dir {args.teacher_dir} is not a toy teacher folder (no toy_teacher.json); "
                         "pass the teacher/ folder of a toy benchmark run, or drop the flag to build one")
    preset = PRESETS[args.mode]
    out = Path(args.output_dir or ROOT / "outputs" / f"toy_benchmark_{args.mode}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    reuse = Path(args.teacher_dir) if args.teacher_dir else (
        ROOT / "outputs" / "toy_benchmark_full" / "teacher" if args.mode == "quick" else None)
    teacher = stage_teacher(out, preset, args.seed, reuse)
    seconds = {"teacher": time.perf_counter() - start}
    # prompts are encoded and images drawn as the teacher was trained (also when a teacher is reused)
    built = json.loads((teacher / "toy_teacher.json").read_text())["config"]
    preset = {**preset, "resolution": built["resolution"], "max_sequence_length": built["max_sequence_length"]}
    data, eval_file = stage_data(out, preset, args.seed)
    trained = stage_distill(out, teacher, data, preset, args.guidance_scale)
    seconds["data_rescale_distill"] = time.perf_counter() - start - seconds["teacher"]
    log(f"training stages done ({time.perf_counter() - start:.0f} s)")

    from evaluation.geneval import load_prompts

    prompts = load_prompts(metadata_file=eval_file)
    pipes = pipelines(teacher, trained)
    nfes = preset.get("nfes", (1, 2, 4))
    plan = [("teacher", "euler", preset.get("teacher_steps", 28)), ("teacher_x1", "euler", preset.get("teacher_steps", 28))]
    plan += [("teacher", "euler", n) for n in nfes] + [("scm", "scm", n) for n in nfes]
    plan += [("meanflow", "meanflow", n) for n in nfes]
    rows = []
    for model, sampler, nfe in plan:
        run = out / "samples" / f"{model}_nfe{nfe}"
        summary = sample_and_score(pipes[model], prompts, run, nfe, preset, args.guidance_scale)
        save_grid(run, out / "grids" / f"{model}_nfe{nfe}.png")
        rows.append({"model": model, "sampler": sampler, "nfe": nfe, "overall": summary["overall"],
                     "categories": summary["categories"], "sec_per_image": summary["sec_per_image"]})
        log(f"{model} ({sampler}, {nfe} steps): overall {summary['overall']:.3f}")
    chance = chance_levels(preset.get("chance_per_tag", 300), resolution=preset["resolution"])
    seconds["sample_score"] = time.perf_counter() - start - sum(seconds.values())
    seconds["total"] = time.perf_counter() - start
    report = write_report(out, rows, chance, args.mode, seconds)
    print(report)
    log(f"done in {time.perf_counter() - start:.0f} s; image grids in {out / 'grids'}")
    return json.loads((out / "results.json").read_text())


if __name__ == "__main__":
    from common.cli import run

    run(main)
