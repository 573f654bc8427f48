"""Shipping a toy teacher: the pipeline plus its x1 twin, loadable through the normal loaders, used by the benchmark."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "script"))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    import ship_toy_teacher
    from toyworld.teacher import PRESETS, build_toy_teacher

    tmp = tmp_path_factory.mktemp("ship")
    build_toy_teacher(tmp / "built", PRESETS["smoke"], log=lambda msg: None)
    dest = ship_toy_teacher.main(["--teacher_dir", str(tmp / "built"), "--dest", str(tmp / "toy_teacher"),
                                  "--work_dir", str(tmp / "work"), "--rescale_steps", "2", "--data_images", "16",
                                  "--batch", "4"])
    return tmp, dest


def test_shipped_folder_loads_strictly_and_samples(shipped):
    from model.loading import load_state_dict_strict, load_transformer, read_state_dict
    from model.pipeline import FluxEulerPipeline
    from ship_toy_teacher import folder_megabytes

    tmp, dest = shipped
    assert not (dest / "build").exists() and not dest.with_name(dest.name + ".partial").exists()
    assert folder_megabytes(dest) < 50
    teacher = load_transformer(str(dest))
    twin = load_transformer(str(dest), weights_path=dest / "transformer_x1", time_input_scale=1.0)
    # the twin is the rescale run's export, bit for bit; the x1000 transformer is the build's
    trained = read_state_dict(tmp / "work" / "rescale" / "transformer")
    assert all(torch.equal(v, trained[k]) for k, v in twin.state_dict().items())
    built = read_state_dict(tmp / "built" / "transformer")
    assert all(torch.equal(v, built[k]) for k, v in teacher.state_dict().items())
    # a wrong key set is refused, not skipped
    with pytest.raises(Exception, match="unexpected|missing|Unexpected|Missing"):
        load_state_dict_strict(load_transformer(str(dest)), {**trained, "extra.weight": torch.zeros(1)},
                               source="test")
    for transformer in (teacher, twin):
        pipe = FluxEulerPipeline.from_pretrained(dest, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(["a photo of a red ring"], num_inference_steps=2, height=32, width=32, output_type="pt",
                     max_sequence_length=12,
                     generator=torch.Generator().manual_seed(0)).images
        assert image.shape[-2:] == (32, 32) and torch.isfinite(image).all()


def test_benchmark_uses_the_shipped_twin_instead_of_rescaling(shipped):
    import toy_benchmark

    tmp, dest = shipped
    out = tmp / "bench"
    result = toy_benchmark.main(["--mode", "smoke", "--teacher_dir", str(dest), "--output_dir", str(out),
                                 "--students", "scm"])
    assert not (out / "rescale").exists() and not (out / "teacher").exists()
    models = {(row["model"], row["nfe"]) for row in result["rows"]}
    assert models == {("teacher", 2), ("teacher_x1", 2), ("teacher", 1), ("scm", 1)}


def test_shipping_refuses_unfinished_builds_and_overwrites(shipped, tmp_path):
    import ship_toy_teacher
    from common.cli import UsageError

    tmp, dest = shipped
    unfinished = tmp_path / "unfinished"
    (unfinished / "build").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(ROOT / "script" / "ship_toy_teacher.py"), "--teacher_dir",
                           str(unfinished), "--dest", str(tmp_path / "d")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "is not a finished toy teacher (missing" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    before = {p: p.stat().st_mtime for p in dest.rglob("*")}
    with pytest.raises(UsageError, match="already exists; pass --force"):
        ship_toy_teacher.main(["--teacher_dir", str(tmp / "built"), "--dest", str(dest)])
    assert before == {p: p.stat().st_mtime for p in dest.rglob("*")}
    with pytest.raises(UsageError, match="over --max_megabytes"):
        ship_toy_teacher.main(["--teacher_dir", str(tmp / "built"), "--dest", str(dest), "--force",
                               "--work_dir", str(tmp / "work"), "--rescale_steps", "2", "--data_images", "16",
                               "--batch", "4", "--max_megabytes", "0.01"])
    assert before == {p: p.stat().st_mtime for p in dest.rglob("*")}  # the shipped folder is left intact


def _other_teacher(src: Path, dst: Path) -> Path:
    """A copy of a teacher folder whose content differs (its scheduler config gains a trailing newline)."""
    import shutil

    shutil.copytree(src, dst)
    config = dst / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text() + "\n")
    return dst


def test_runs_are_tied_to_their_teacher_and_settings(shipped, tmp_path, monkeypatch):
    """A rebuilt teacher never reuses the rescale run (x1 twin) of the one before, and a benchmark folder refuses
    another teacher or guidance instead of mixing its stages with theirs."""
    import ship_toy_teacher
    import toy_benchmark
    from common.cli import UsageError

    tmp, dest = shipped
    other = _other_teacher(tmp / "built", tmp_path / "other")
    assert toy_benchmark.teacher_digest(other) != toy_benchmark.teacher_digest(tmp / "built")
    refused = r"work holds .*rescale made with other inputs: teacher '.*pass another --work_dir"
    with pytest.raises(UsageError, match=refused):
        ship_toy_teacher.main(["--teacher_dir", str(other), "--dest", str(tmp_path / "d"), "--work_dir",
                               str(tmp / "work"), "--rescale_steps", "2", "--data_images", "16", "--batch", "4"])
    assert not (tmp_path / "d").exists()
    # the default work folder is one per teacher content and settings
    monkeypatch.setattr(ship_toy_teacher, "DEFAULT_WORK", tmp_path / "works")
    ship_toy_teacher.main(["--teacher_dir", str(other), "--dest", str(tmp_path / "d"), "--rescale_steps", "2",
                           "--data_images", "16", "--batch", "4"])
    (work,) = (tmp_path / "works").iterdir()
    assert work.name == toy_benchmark.teacher_digest(other)[:16] + "-2-16-4"

    out = tmp / "bench"  # the smoke run of test_benchmark_uses_the_shipped_twin_instead_of_rescaling, or a fresh one
    argv = ["--mode", "smoke", "--teacher_dir", str(dest), "--output_dir", str(out), "--students", "scm"]
    if not (out / toy_benchmark.RUN_STAMP).exists():
        toy_benchmark.main(argv)
    recorded = json.loads((out / toy_benchmark.RUN_STAMP).read_text())
    assert recorded["teacher"] == toy_benchmark.teacher_digest(dest) and recorded["guidance_scale"] == 3.5
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    other_shipped = _other_teacher(dest, tmp_path / "other_shipped")
    for flags, changed in ((["--guidance_scale", "2"], "guidance_scale 3.5 (recorded) vs 2.0"),
                           (["--teacher_dir", str(other_shipped)], "teacher '"),
                           (["--build_teacher"], "teacher '"),  # refused before building, not after
                           (["--rescale"], "rescale False (recorded) vs True")):
        with pytest.raises(UsageError, match=f"holds .*students.* made with other inputs: {re.escape(changed)}"):
            toy_benchmark.main(argv + flags)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and not (out / "teacher").exists()
    # a folder from before the record (stages, no run_inputs.json) is refused; one without stages is claimed
    stale = tmp_path / "stale"
    (stale / "students").mkdir(parents=True)
    with pytest.raises(UsageError, match="holds students without a record of what made them .*delete students in it"):
        toy_benchmark.main(["--mode", "smoke", "--teacher_dir", str(dest), "--output_dir", str(stale)])
    (stale / "students").rmdir()
    for damaged in ("{", "[]"):  # a damaged record: refused while stages exist, replaced when none does
        (stale / "students").mkdir()
        (stale / toy_benchmark.RUN_STAMP).write_text(damaged)
        with pytest.raises(UsageError, match="is not a JSON object of run inputs, so what made students is unknown"):
            toy_benchmark.claim_run_dir(stale, {"teacher": "x"}, "--output_dir")
        (stale / "students").rmdir()
        toy_benchmark.claim_run_dir(stale, {"teacher": "x"}, "--output_dir")
        assert json.loads((stale / toy_benchmark.RUN_STAMP).read_text()) == {"teacher": "x"}
    toy_benchmark.claim_run_dir(stale, {"teacher": "y"}, "--output_dir")  # nothing was made from "x": re-recorded
    assert json.loads((stale / toy_benchmark.RUN_STAMP).read_text()) == {"teacher": "y"}
    # a record from before the settings hash (with stages) is accepted, and completed with "unknown", not a guess
    (stale / "students").mkdir()
    (stale / toy_benchmark.RUN_STAMP).write_text(json.dumps({"teacher": "y"}))
    for settings in ("s", "t"):
        toy_benchmark.claim_run_dir(stale, {"teacher": "y", "settings": settings}, "--output_dir")
        assert json.loads((stale / toy_benchmark.RUN_STAMP).read_text()) == {"teacher": "y",
                                                                            "settings": toy_benchmark.UNKNOWN}
    (stale / toy_benchmark.RUN_STAMP).write_text(json.dumps({"teacher": "y", "settings": "s"}))
    with pytest.raises(UsageError, match=re.escape("settings 's' (recorded) vs 't'")):
        toy_benchmark.claim_run_dir(stale, {"teacher": "y", "settings": "t"}, "--output_dir")


def test_settings_hash_covers_the_stages_command_lines(monkeypatch):
    """The run record's settings hash changes with anything the students' or the twin's command lines take from
    the code (a flag hard-coded in a stage, a student's flags), not only with the preset."""
    import toy_benchmark

    preset = toy_benchmark.PRESETS["full"]
    base = toy_benchmark.settings_digest(preset)
    assert toy_benchmark.settings_digest(dict(preset)) == base
    assert toy_benchmark.settings_digest({**preset, "students": ("scm",), "seeds": (5,)}) == base
    assert toy_benchmark.settings_digest({**preset, "sid_batch": 8}) != base
    common = toy_benchmark.common_train_args
    monkeypatch.setattr(toy_benchmark, "common_train_args", lambda *a: [*common(*a), "--lr_warmup_steps", "50"])
    assert toy_benchmark.settings_digest(preset) != base
    monkeypatch.undo()
    monkeypatch.setitem(toy_benchmark.STUDENTS, "scm", (*toy_benchmark.STUDENTS["scm"][:2], ["--learning_rate", "1"]))
    assert toy_benchmark.settings_digest(preset) != base


def test_a_built_teacher_is_reused_only_for_its_own_settings(shipped, tmp_path):
    """--build_teacher reuses the run folder's finished teacher only when it was built with this mode's settings;
    another mode's build is refused on one line naming the differences and how to use it instead."""
    import shutil

    import toy_benchmark
    from common.cli import UsageError

    tmp, _ = shipped
    out = tmp_path / "run"
    shutil.copytree(tmp / "built", out / "teacher")
    seed = toy_benchmark.PRESETS["smoke"]["teacher"].seed
    assert toy_benchmark.stage_teacher(out, toy_benchmark.PRESETS["smoke"], seed, None, True) == out / "teacher"
    with pytest.raises(UsageError, match=r"holds a teacher built with other settings than this --mode's \(.*"
                                         r"num_images 48 \(built\) vs 4000.*use it with --teacher_dir"):
        toy_benchmark.stage_teacher(out, toy_benchmark.PRESETS["quick"], seed, None, True)
    with pytest.raises(UsageError, match=r"seed .* \(built\) vs 7"):
        toy_benchmark.stage_teacher(out, toy_benchmark.PRESETS["smoke"], 7, None, True)
    # a build recorded before the cycle, text-stage and reading-order settings existed is still this mode's
    record = out / "teacher" / "build" / "config.json"
    held = json.loads(record.read_text())
    assert held["flow_cycles"] == 1 and held["text_pretrain_steps"] == 0
    for key in ("flow_cycles", "cycle_steps", "cycle_lr", "text_pretrain_steps", "text_pretrain_lr",
                "reading_order_from_cycle"):
        del held[key]
    record.write_text(json.dumps(held))
    assert toy_benchmark.stage_teacher(out, toy_benchmark.PRESETS["smoke"], seed, None, True) == out / "teacher"
    record.unlink()
    with pytest.raises(UsageError, match=r"without its build record \(build/config.json\), so its settings are"):
        toy_benchmark.stage_teacher(out, toy_benchmark.PRESETS["smoke"], seed, None, True)
