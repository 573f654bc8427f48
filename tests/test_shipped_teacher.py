"""The toy teacher shipped in toyworld/toy_teacher: complete, within budget, strict to load, and able to sample."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "script"))
SHIPPED = ROOT / "toyworld" / "toy_teacher"


def test_shipped_teacher_is_complete_and_within_the_size_budget():
    from ship_toy_teacher import PIPELINE_PARTS, folder_megabytes

    assert all((SHIPPED / part).exists() for part in PIPELINE_PARTS), "toyworld/toy_teacher is incomplete"
    assert (SHIPPED / "transformer_x1" / "config.json").exists()
    assert folder_megabytes(SHIPPED) <= 50
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".bin", ".pkl", ".pth")], "weights are shipped as safetensors"
    info = json.loads((SHIPPED / "toy_teacher.json").read_text())
    assert info["config"]["flow_steps"] >= 1 and info["x1_twin"]["made_by"] == "train_rescale.py"


def test_shipped_teacher_and_twin_load_strictly_and_sample():
    from model.loading import load_transformer
    from model.pipeline import FluxEulerPipeline

    config = json.loads((SHIPPED / "toy_teacher.json").read_text())["config"]
    teacher = load_transformer(str(SHIPPED))
    twin = load_transformer(str(SHIPPED), weights_path=SHIPPED / "transformer_x1", time_input_scale=1.0)
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in twin.parameters())
    images = []
    for transformer in (teacher, twin):
        pipe = FluxEulerPipeline.from_pretrained(SHIPPED, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(["a photo of a red circle"], num_inference_steps=8, height=config["resolution"],
                           width=config["resolution"], max_sequence_length=config["max_sequence_length"],
                           output_type="pt", generator=torch.Generator().manual_seed(0)).images)
    assert all(torch.isfinite(x).all() for x in images)
    # the twin is a rescaled copy of the teacher, not another model: same noise, nearly the same image
    assert (images[0] - images[1]).abs().mean() < 0.1


def test_toy_benchmark_smoke_run_from_the_shipped_teacher(tmp_path):
    import toy_benchmark

    result = toy_benchmark.main(["--mode", "smoke", "--teacher_dir", str(SHIPPED), "--output_dir", str(tmp_path),
                                 "--students", "scm", "sid"])
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "rescale").exists()
    assert {(r["model"], r["nfe"]) for r in result["rows"]} == {("teacher", 2), ("teacher_x1", 2), ("teacher", 1),
                                                               ("scm", 1), ("sid", 1)}


def test_quick_preset_finds_the_shipped_teachers_recorded_rows(tmp_path):
    """The quickstart takes the teacher's 28-step row from the shipped record; a change to the teacher, the
    held-out prompts, the settings or the sampling/scoring code makes the record stale (the quickstart would then
    sample the row itself, minutes slower): re-record it with
    `python script/toy_benchmark.py --quick --resample_teacher --record_teacher_rows`."""
    import toy_benchmark
    from toyworld.world import write_eval_metadata

    preset = toy_benchmark.PRESETS["quick"]
    config = json.loads((SHIPPED / "toy_teacher.json").read_text())["config"]
    preset = {**preset, "resolution": config["resolution"], "max_sequence_length": config["max_sequence_length"]}
    eval_file = tmp_path / "eval_metadata.jsonl"
    write_eval_metadata(eval_file, preset["eval_per_tag"], 0)
    assert preset["recorded_teacher_nfes"]
    for nfe in preset["recorded_teacher_nfes"]:
        key = toy_benchmark.teacher_row_key(SHIPPED, eval_file, nfe, preset, 3.5)
        row = toy_benchmark.recorded_teacher_row(SHIPPED, key)
        assert row is not None, f"the shipped teacher has no recorded {nfe}-step row for the quick preset"
        assert row["nfe"] == nfe and 0.0 < row["overall"] < 1.0
