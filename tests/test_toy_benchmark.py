"""A smoke run of every stage of script/toy_benchmark.py on a minimal configuration."""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "script"))


def test_toy_benchmark_stages_run_end_to_end_and_resume(tmp_path):
    import toy_benchmark

    out = tmp_path / "bench"
    result = toy_benchmark.main(["--mode", "smoke", "--output_dir", str(out)])
    rows = result["rows"]
    assert {(r["model"], r["nfe"]) for r in rows} == {("teacher", 2), ("teacher_x1", 2), ("teacher", 1), ("scm", 1),
                                                      ("meanflow", 1), ("sid", 1)}
    for row in rows:
        assert set(row) == {"model", "sampler", "nfe", "overall", "spread", "seeds", "ci95", "categories",
                            "train_minutes", "sec_per_image", "recorded"}
        assert 0.0 <= row["ci95"] < 1.0
        assert 0.0 <= row["overall"] <= 1.0 and row["sec_per_image"] > 0
        assert set(row["categories"]) == set(toy_benchmark.TAGS)
        seed = "" if row["model"].startswith("teacher") else "_seed0"
        assert (out / "grids" / f"{row['model']}{seed}_nfe{row['nfe']}.png").exists()
        assert (row["train_minutes"] is None) == row["model"].startswith("teacher")
    assert all(r["overall_se"] >= 0.0 for r in result["per_seed"])  # the interval is computed, not defaulted
    assert "| model | sampler | NFE | overall (seeds: mean, spread) | +-95% |" in (out / "results.md").read_text()
    teacher = out / "teacher"
    assert json.loads((teacher / "toy_teacher.json").read_text())["config"]["num_images"] == 48
    # the toy teacher is a plain diffusers FLUX folder, loaded like the real one
    from diffusers import FluxPipeline

    assert FluxPipeline.from_pretrained(teacher).transformer.config.guidance_embeds
    # a second run reuses every stage (nothing is retrained or resampled) and gives the same table
    student = out / "students" / "sid_seed0" / "transformer"
    mtimes = {p: p.stat().st_mtime for p in student.iterdir()}
    again = toy_benchmark.main(["--mode", "smoke", "--output_dir", str(out)])
    assert again["rows"] == rows
    assert mtimes == {p: p.stat().st_mtime for p in student.iterdir()}
    assert not any(r["recorded"] for r in rows) and not (teacher / toy_benchmark.TEACHER_RECORD).exists()

    # the teacher's rows, once recorded, are taken from its record instead of being sampled again
    recorded = toy_benchmark.main(["--mode", "smoke", "--output_dir", str(out), "--record_teacher_rows"])
    assert recorded["rows"] == rows and (teacher / toy_benchmark.TEACHER_RECORD).exists()
    shutil.move(out / "samples" / "teacher_nfe2", tmp_path / "teacher_nfe2")
    reused = toy_benchmark.main(["--mode", "smoke", "--output_dir", str(out)])
    assert not (out / "samples" / "teacher_nfe2").exists()
    assert [{**r, "recorded": False} for r in reused["rows"]] == rows
    assert [set(r) - {"recorded"} for r in reused["per_seed"]] == [set(r) - {"recorded"} for r in recorded["per_seed"]]
    assert [r["recorded"] for r in reused["rows"]] == [r["model"] == "teacher" and r["nfe"] == 2 for r in rows]
    assert "euler (recorded)" in (out / "results.md").read_text()
    resampled = toy_benchmark.main(["--mode", "smoke", "--output_dir", str(out), "--resample_teacher"])
    # sampled again: the same images (so the same scores), only the timing differs
    pngs = sorted(p.relative_to(tmp_path / "teacher_nfe2") for p in (tmp_path / "teacher_nfe2").rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(out / "samples" / "teacher_nfe2")
                                   for p in (out / "samples" / "teacher_nfe2").rglob("*.png"))
    assert all((tmp_path / "teacher_nfe2" / p).read_bytes() == (out / "samples" / "teacher_nfe2" / p).read_bytes()
               for p in pngs)
    assert [{**r, "sec_per_image": 0} for r in resampled["rows"]] == [{**r, "sec_per_image": 0} for r in rows]


def test_teacher_row_key_follows_what_a_row_depends_on(tmp_path):
    import toy_benchmark

    teacher, eval_file = tmp_path / "teacher", tmp_path / "eval.jsonl"
    (teacher / "transformer").mkdir(parents=True)
    (teacher / toy_benchmark.SHIPPED_X1).mkdir()
    (teacher / "transformer" / "w.safetensors").write_bytes(b"weights")
    eval_file.write_text("prompts")
    preset = {"resolution": 64, "max_sequence_length": 32, "images_per_prompt": 1}

    def key(nfe=28, guidance=3.5, **changes):
        return toy_benchmark.teacher_row_key(teacher, eval_file, nfe, {**preset, **changes}, guidance)

    base = key()
    # records, build state and the x1 twin do not change what the x1000 teacher samples
    (teacher / "toy_teacher.json").write_text("{}")
    (teacher / toy_benchmark.TEACHER_RECORD).write_text("{}")
    (teacher / toy_benchmark.SHIPPED_X1 / "w.safetensors").write_bytes(b"twin")
    (teacher / "build").mkdir()
    (teacher / "build" / "flow.pt").write_bytes(b"state")
    assert key() == base
    (teacher / "vae").mkdir()
    (teacher / "vae" / "config.json").write_text("{}")
    assert key() != base
    base = key()
    assert len({base, key(nfe=4), key(guidance=1.0), key(images_per_prompt=4), key(resolution=32),
                key(max_sequence_length=16)}) == 6
    eval_file.write_text("other prompts")
    assert key() != base
    eval_file.write_text("prompts")
    (teacher / "transformer" / "w.safetensors").write_bytes(b"weightz")
    assert key() != base


def test_overall_standard_error_treats_a_prompts_images_as_one_sample(tmp_path):
    import toy_benchmark

    lines = []
    for tag in toy_benchmark.TAGS:
        for prompt, correct in ((0, [True] * 4), (1, [tag != "counting"] * 4), (2, [True, False, True, False])):
            lines += [json.dumps({"filename": f"run/{tag}{prompt}/samples/{i:04d}.png", "tag": tag, "correct": c})
                      for i, c in enumerate(correct)]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines))
    # per-prompt means: [1, 1, .5] in five tags (variance 1/12) and [1, 0, .5] in counting (variance 1/4)
    expected = (5 * (1 / 12) / 3 + (1 / 4) / 3) ** 0.5 / 6
    assert abs(toy_benchmark.overall_standard_error(path) - expected) < 1e-12
