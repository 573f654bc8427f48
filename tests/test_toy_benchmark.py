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
        assert set(row) == {"model", "sampler", "nfe", "overall", "spread", "seeds", "categories", "train_minutes",
                            "sec_per_image"}
        assert 0.0 <= row["overall"] <= 1.0 and row["sec_per_image"] > 0
        assert set(row["categories"]) == set(toy_benchmark.TAGS)
        seed = "" if row["model"].startswith("teacher") else "_seed0"
        assert (out / "grids" / f"{row['model']}{seed}_nfe{row['nfe']}.png").exists()
        assert (row["train_minutes"] is None) == row["model"].startswith("teacher")
    assert "| model | sampler | NFE | overall (seeds: mean, spread) |" in (out / "results.md").read_text()
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
