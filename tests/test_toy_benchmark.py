"""A smoke run of every stage of script/toy_benchmark.py on a minimal configuration."""

import json
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
                            "train_minutes", "sec_per_image"}
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
