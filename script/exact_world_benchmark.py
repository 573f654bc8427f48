"""The exact-world benchmark: every method's own loss, trained where the answer is known, scored against it.

    python script/exact_world_benchmark.py [--output_dir outputs/exact_world] [--results docs/exact_world_results.json]

Stages (each reused when its output exists, so an interrupted run continues; the run folder records its settings
and refuses another's):
  1. the teacher's reference samples: its ODE (256 Euler steps) from two noise seeds (exactworld.evaluate)
  2. the velocity fit: an ExactWorldNet regressed onto the exact guided velocity (the students' start, the
     world's "x1 twin")
  3. sCM, MeanFlow and SiD students from the fit, through training.Trainer with the unchanged losses, each with its
     recipe below and a fixed number of steps (not wall time: the result does not depend on the CPU)
  4. scores: the teacher's own Euler sampler at 1/2/4/8/28 steps, the fit's at 1/2/4/8/28/64, each student at 1/2/4
     (and at 1 step along its training, from its checkpoints), the metric's floor; the bars; JSON, a markdown
     table and a figure
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.cli import ArgumentParser, UsageError, positive_float, positive_int, run  # noqa: E402

# Every recipe shares these; steps and batches are per student. The fit is the students' starting point.
COMMON = ["--lr_warmup_steps", "50", "--adam_weight_decay", "0", "--ema_decay", "0.999", "--seed", "0"]
RECIPES = {
    "fit": ["--max_train_steps", "3000", "--train_batch_size", "256", "--learning_rate", "1e-3",
            "--lr_scheduler", "cosine"],
    "scm": ["--max_train_steps", "3000", "--train_batch_size", "256", "--learning_rate", "1e-4",
            "--lr_scheduler", "cosine", "--tangent_warmup_steps", "200", "--logit_mean", "0.2", "--logit_std", "1.6"],
    # plain squared error: the reference's adaptive weighting (p = 1) holds the 1-step student back (docs)
    "meanflow": ["--max_train_steps", "5000", "--train_batch_size", "256", "--learning_rate", "1e-4",
                 "--lr_scheduler", "cosine", "--zero_init_dual", "--weighting", "uniform"],
    # no clipping (SiD-DiT's default recipe): clipping every step by norm 1 left the 2-step generator at 2x the floor
    "sid": ["--max_train_steps", "5000", "--train_batch_size", "256", "--learning_rate", "1e-4",
            "--fake_learning_rate", "1e-4", "--lr_scheduler", "cosine", "--max_grad_norm", "0"],
}
STUDENTS = ("scm", "meanflow", "sid")
CURVE_POINTS = 4  # checkpoints along each student's training, scored at 1 step
TEACHER_NFES, FIT_NFES, STUDENT_NFES = (1, 2, 4, 8, 28), (1, 2, 4, 8, 28, 64), (1, 2, 4)
# bars: a student's distance at `nfe` must be at or below the teacher's Euler distance at the paired NFE
DISTANCE_BARS = {1: 4, 2: 8}
ACCURACY_BAR = 0.95


def log(msg: str) -> None:
    print(f"[exact-world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def guidance_flags(method: str, guidance: float) -> list[str]:
    g = str(guidance)
    return {"fit": [], "scm": ["--scm_cfg_scale", g], "meanflow": ["--cfg_scale", g],
            "sid": ["--teacher_guidance", g, "--generator_guidance", g, "--fake_guidance", g]}[method]


def command(method: str, out: Path, init: Path | None, guidance: float) -> list[str]:
    steps = int(RECIPES[method][RECIPES[method].index("--max_train_steps") + 1])
    every = steps // CURVE_POINTS if method != "fit" else 0
    argv = ["--method", method, "--output_dir", str(out / method), "--world_guidance", str(guidance),
            "--checkpointing_steps", str(every), *COMMON, *RECIPES[method], *guidance_flags(method, guidance)]
    return argv + (["--init", str(init)] if init else [])


def train_jobs(jobs: list[tuple[str, list[str]]], parallel: int) -> None:
    """Run `python -m exactworld.train ARGV` jobs, `parallel` at a time (each on its share of the cores)."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // parallel))

    def one(job):
        name, argv = job
        log(f"training {name} ({threads} thread(s))")
        result = subprocess.run([sys.executable, "-m", "exactworld.train", *argv], cwd=ROOT, capture_output=True,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)})
        if result.returncode:
            raise RuntimeError(f"exactworld.train {name} failed:\n{result.stderr[-3000:]}")

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, jobs))


def settings_digest(world_config, per_prompt: int) -> str:
    """What the references and the fit depend on; each student's own recipe is stamped in its folder."""
    return hashlib.sha256(repr((world_config.to_dict(), per_prompt, COMMON, RECIPES["fit"],
                                CURVE_POINTS)).encode()).hexdigest()


def claim_student(out: Path, method: str, argv: list[str]) -> None:
    """A student folder trained with another command line is refused (delete it to retrain), never mixed."""
    folder, stamp = out / method, out / method / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text())["argv"] != argv:
        raise UsageError(f"{folder} was trained with another recipe than RECIPES[{method!r}]; delete that folder to "
                         "retrain it, or pass another --output_dir")
    if folder.is_dir() and not stamp.exists() and any(folder.iterdir()):
        raise UsageError(f"{folder} has no recipe.json (made by an older version); delete it to retrain")
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"argv": argv}))


def claim(out: Path, digest: str) -> None:
    stamp = out / "settings.json"
    made = [p.name for p in out.iterdir() if p.name != stamp.name] if out.is_dir() else []
    if stamp.exists() and json.loads(stamp.read_text())["digest"] != digest and made:
        raise UsageError(f"{out} holds stages made with other settings ({', '.join(sorted(made)[:4])}); pass another "
                         "--output_dir or delete them")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"digest": digest}))


def references(out: Path, world, per_prompt: int):
    from safetensors.torch import load_file, save_file

    from exactworld.evaluate import References
    from exactworld.world import sw_directions

    path = out / "references.safetensors"
    if path.exists():
        t = load_file(path)
        return References(t["ids"], t["a"], t["b"], sw_directions(world.config.dim))
    log(f"teacher ODE references: {per_prompt} samples per prompt, two seeds")
    refs = References.make(world, per_prompt)
    save_file({"ids": refs.ids, "a": refs.a.contiguous(), "b": refs.b.contiguous()}, path)
    return refs


def curve(world, refs, method: str, run_dir: Path) -> list[dict]:
    """1-step scores of the exports saved along a student's training (checkpoint-<step>/transformer)."""
    from exactworld.evaluate import load_export, score_model

    rows = []
    for ckpt in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(ckpt.name.split("-")[1])
        row = score_model(world, refs, method, load_export(ckpt / "transformer"), [1], export=ckpt / "transformer")[0]
        rows.append({"model": method, "step": step, **{k: row[k] for k in ("distance", "mode_accuracy", "mode_tv")}})
    return rows


def bars(rows: list[dict]) -> list[dict]:
    euler = {r["nfe"]: r["distance"] for r in rows if r["model"] == "teacher"}
    checks = []
    for r in rows:
        if r["model"] not in STUDENTS:
            continue
        if r["nfe"] in DISTANCE_BARS:
            bar = euler[DISTANCE_BARS[r["nfe"]]]
            checks.append({"model": r["model"], "nfe": r["nfe"], "what": f"distance <= teacher Euler at "
                           f"{DISTANCE_BARS[r['nfe']]} steps", "value": r["distance"], "bar": bar,
                           "pass": r["distance"] <= bar})
        checks.append({"model": r["model"], "nfe": r["nfe"], "what": "mode accuracy", "value": r["mode_accuracy"],
                       "bar": ACCURACY_BAR, "pass": r["mode_accuracy"] >= ACCURACY_BAR})
    return checks


def fmt(x, digits=3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    floor = result["floor"]
    lines = ["| model | sampler | NFE | sliced W2 | x floor | mode accuracy | mode TV (vs reference) | "
             "mode TV (vs mixture) | per-sample error |", "|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| floor (two reference sets) | | | {fmt(floor['distance'])} | 1.0 | {fmt(floor['mode_accuracy'])} | "
                 f"{fmt(floor['mode_tv'])} | {fmt(floor['mode_tv_true'])} | |")
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {fmt(r['distance'])} | "
                     f"{r['distance'] / floor['distance']:.1f} | {fmt(r['mode_accuracy'])} | {fmt(r['mode_tv'])} | "
                     f"{fmt(r['mode_tv_true'])} | {fmt(r['per_sample_error'])} |")
    lines += ["", "Bars:"] + [f"- {b['model']} {b['nfe']} step(s): {b['what']}: {b['value']:.3f} vs {b['bar']:.3f}: "
                              f"{'PASS' if b['pass'] else 'MISS'}" for b in result["bars"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, world, refs, samples: dict, path: Path) -> None:
    """Left: distance vs NFE (teacher Euler, fit Euler, students, floor). Right: samples of two prompts in the
    modes' plane for the reference, the teacher's 1- and 2-step Euler and each student at 1 step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 6.2))
    ax = fig.add_subplot(1, 2, 1)
    for model, style in (("teacher", "k-o"), ("fit", "k:s"), ("scm", "C0-o"), ("meanflow", "C1-o"), ("sid", "C2-o")):
        rows = [r for r in result["rows"] if r["model"] == model]
        if rows:
            label = {"teacher": "teacher, Euler", "fit": "velocity fit, Euler"}.get(model, model)
            ax.plot([r["nfe"] for r in rows], [r["distance"] for r in rows], style, label=label)
    ax.axhline(result["floor"]["distance"], color="grey", ls="--", label="floor (two reference sets)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 28, 64], labels=["1", "2", "4", "8", "28", "64"])
    ax.set_yscale("log")
    ax.set_xlabel("steps (NFE)")
    ax.set_ylabel("sliced W2 to the teacher's ODE samples")
    ax.set_title("Exact world: distance to the teacher's distribution")
    ax.legend(fontsize=8)
    panels = list(samples.items())
    prompts = (0, 1)
    for i, (name, x) in enumerate(panels):
        a = fig.add_subplot(2, 2 * ((len(panels) + 1) // 2), (i // ((len(panels) + 1) // 2)) * 2
                            * ((len(panels) + 1) // 2) + (len(panels) + 1) // 2 + 1 + i % ((len(panels) + 1) // 2))
        xy = x.reshape(len(x), -1).double() @ world.basis
        for p, color in zip(prompts, ("C3", "C9")):
            sel = refs.ids == p
            a.scatter(xy[sel, 0][:300], xy[sel, 1][:300], s=1.5, c=color, alpha=0.5)
        modes = world.plane_coords
        for p, color in zip(prompts, ("C3", "C9")):
            m = modes[world.mode_prompt == p]
            a.scatter(m[:, 0], m[:, 1], marker="x", c=color, s=30)
        other = modes[(world.mode_prompt != prompts[0]) & (world.mode_prompt != prompts[1])]
        a.scatter(other[:, 0], other[:, 1], marker="+", c="grey", s=15)
        a.set_title(name, fontsize=8)
        a.set_xticks([])
        a.set_yticks([])
        a.set_aspect("equal")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    from exactworld.evaluate import SEED_B, References, load_export, sample, score_model, headless_pipeline
    from exactworld.networks import ExactTeacher
    from exactworld.world import GaussianMixtureWorld, WorldConfig

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "exact_world"))
    parser.add_argument("--results", default=str(ROOT / "docs" / "exact_world_results.json"),
                        help="the JSON written (a .md table and a .png figure go beside it)")
    parser.add_argument("--per_prompt", type=positive_int, default=1024, help="reference samples per prompt")
    parser.add_argument("--jobs", type=positive_int, default=2, help="students trained at once")
    parser.add_argument("--students", nargs="+", choices=STUDENTS, default=list(STUDENTS))
    parser.add_argument("--guidance", type=positive_float, default=WorldConfig.guidance,
                        help="the CFG scale of the teacher the students learn and are scored against (the world's "
                             "default 2; 1 is the mixture itself, where the guided ODE's output is the data)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)
    world_config = WorldConfig(guidance=args.guidance)
    world = GaussianMixtureWorld(world_config)
    guidance = world_config.guidance
    claim(out, settings_digest(world_config, args.per_prompt))
    refs = references(out, world, args.per_prompt)

    if not (out / "fit" / "transformer").exists():
        train_jobs([("fit", command("fit", out, None, guidance))], 1)
    fit = out / "fit" / "transformer"
    for m in args.students:
        claim_student(out, m, command(m, out, fit, guidance))
    todo = [(m, command(m, out, fit, guidance)) for m in args.students if not (out / m / "transformer").exists()]
    train_jobs(todo, args.jobs)
    seconds_training = time.perf_counter() - start

    log("scoring")
    rows = score_model(world, refs, "euler", ExactTeacher(world), list(TEACHER_NFES), model="teacher")
    rows += score_model(world, refs, "euler", load_export(fit), list(FIT_NFES), model="fit")
    curves = []
    for m in args.students:
        summary = json.loads((out / m / "training_summary.json").read_text())
        rows += score_model(world, refs, m, load_export(out / m / "transformer"), list(STUDENT_NFES),
                            export=out / m / "transformer", model=m, train_steps=summary["global_step"],
                            train_seconds=round(summary["train_seconds"], 1))
        curves += curve(world, refs, m, out / m)
    result = {
        "about": "exact-world benchmark (script/exact_world_benchmark.py): distance = sliced W2 over 256 fixed random "
                 "directions of R^d, per prompt then averaged, against the teacher's ODE (256 Euler steps) from "
                 "independent noise; floor = the same distance between two reference sets; mode accuracy = share of "
                 "samples whose nearest mode belongs to their prompt; mode TV = total variation of the nearest-mode "
                 "histogram against the reference's (and the mixture's weights); per-sample error = mean "
                 "||x - x_ODE|| from the same initial noise (deterministic samplers only)",
        "world": world_config.to_dict(),
        "samples_per_prompt": args.per_prompt,
        "recipes": {m: COMMON + RECIPES[m] for m in RECIPES},
        "floor": refs.floor(world),
        "rows": rows,
        "curves": curves,
    }
    result["bars"] = bars(rows)
    result["seconds"] = {"training": round(seconds_training), "total": round(time.perf_counter() - start)}

    teacher = ExactTeacher(world)
    panels = {"teacher ODE (reference)": refs.a,
              "teacher Euler, 1 step": sample(world, headless_pipeline("euler", teacher), refs.ids, 1, SEED_B),
              "teacher Euler, 2 steps": sample(world, headless_pipeline("euler", teacher), refs.ids, 2, SEED_B)}
    for m in args.students:
        net = load_export(out / m / "transformer")
        panels[f"{m}, 1 step"] = sample(world, headless_pipeline(m, net, out / m / "transformer"), refs.ids, 1, SEED_B)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1))
    table = markdown(result)
    results.with_suffix(".md").write_text(table)
    plot(result, world, refs, panels, results.with_suffix(".png"))
    print(table)
    log(f"done in {time.perf_counter() - start:.0f} s: {results}, {results.with_suffix('.md')}, "
        f"{results.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    run(main)
