"""The training skeleton through train_sCM.py on the tiny FLUX: steps, resume, crashes, bad inputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_meanflow
import train_sCM
from training import Trainer, rank_seed, reset_accelerate
from training.checkpoint import list_checkpoints, resolve_resume

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), num_images=12, resolution=32, seed=0)


def scm_args(tiny_flux, dataset, out, *extra):
    return ["--pretrained_model_name_or_path", str(tiny_flux), "--allow_unrescaled_teacher",
            "--dataset_name", str(dataset), "--resolution", "32", "--train_batch_size", "2",
            "--max_sequence_length", "16", "--dataloader_num_workers", "0", "--output_dir", str(out),
            "--report_to", "none", "--learning_rate", "1e-3", "--lr_scheduler", "linear", "--lr_warmup_steps", "2",
            "--tangent_warmup_steps", "3", "--seed", "7", *extra]


METHODS = {"scm": (train_sCM.parse_args, train_sCM.SCM), "meanflow": (train_meanflow.parse_args, train_meanflow.MeanFlow)}


def train(argv, method_hook=None, method="scm"):
    reset_accelerate()
    parse, cls = METHODS[method]
    args = parse(argv)
    method = cls(args)
    if method_hook:
        method_hook(method)
    try:
        return Trainer(args, method).train()
    finally:
        reset_accelerate()


def weights(folder):
    return load_file(Path(folder) / "diffusion_pytorch_model.safetensors")


def test_a_few_steps_train_checkpoint_and_export(tiny_flux, dataset, tmp_path):
    out = tmp_path / "run"
    final = train(scm_args(tiny_flux, dataset, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                           "--checkpoints_total_limit", "1", "--gradient_checkpointing"))
    assert [step for step, _ in list_checkpoints(out)] == [4]  # pruned to the newest
    assert sorted(p.name for p in (out / "ckpts").iterdir()) == ["transformer_4.pt"]
    exported = weights(final)
    start = load_file(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(exported) == set(start)
    assert any(not torch.equal(exported[k], start[k]) for k in start)  # it trained
    pt = torch.load(out / "ckpts" / "transformer_4.pt", map_location="cpu", weights_only=True)
    assert set(pt) == {"module"} and all(torch.equal(pt["module"][k], exported[k]) for k in exported)
    from model.transformer import FluxTransformer

    student = FluxTransformer.from_pretrained(final)
    assert student.config.time_input_scale == 1.0
    state = json.loads((out / "training_summary.json").read_text())
    assert state["global_step"] == 4 and state["nonfinite_skipped"] == 0


METHOD_FLAGS = {"scm": (), "meanflow": ("--use_cfg_meanflow", "True", "--cfg_kappa", "0.5", "--cfg_prob", "0.3")}


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_resume_continues_exactly(tiny_flux, dataset, tmp_path, method):
    """6 steps straight == 3 steps, a crash, then --resume_from_checkpoint latest (fp32, CPU)."""
    common = ("--max_train_steps", "6", "--checkpointing_steps", "3", *METHOD_FLAGS[method])
    argv = [a for a in scm_args(tiny_flux, dataset, "OUT") if a not in ("--tangent_warmup_steps", "3")] \
        if method == "meanflow" else scm_args(tiny_flux, dataset, "OUT")

    def args_for(out, *extra):
        return [str(out) if a == "OUT" else a for a in argv] + list(common) + list(extra)

    straight = weights(train(args_for(tmp_path / "a"), method=method))

    def crash_after_step_3(method):
        original = method.loss

        def loss(*args, **kwargs):
            if args[3] >= 3:  # step index passed to the loss
                raise KeyboardInterrupt("simulated kill")
            return original(*args, **kwargs)

        method.loss = loss

    with pytest.raises(KeyboardInterrupt):
        train(args_for(tmp_path / "b"), method_hook=crash_after_step_3, method=method)
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]
    resumed = weights(train(args_for(tmp_path / "b", "--resume_from_checkpoint", "latest"), method=method))
    assert set(resumed) == set(straight)
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(tiny_flux, dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    original = Trainer.export

    def export(self, folder, step):
        calls["n"] += 1
        if step == 4:
            raise KeyboardInterrupt("killed while writing checkpoint-4")
        return original(self, folder, step)

    monkeypatch.setattr(Trainer, "export", export)
    with pytest.raises(KeyboardInterrupt):
        train(scm_args(tiny_flux, dataset, out, "--max_train_steps", "6", "--checkpointing_steps", "2"))
    assert resolve_resume(out, "latest") == out / "checkpoint-2"
    assert (out / ".checkpoint-4.tmp").exists() and not (out / "checkpoint-4").exists()
    monkeypatch.setattr(Trainer, "export", original)
    train(scm_args(tiny_flux, dataset, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                   "--resume_from_checkpoint", "latest"))
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]


def test_non_finite_loss_is_skipped_counted_and_stops_the_run(tiny_flux, dataset, tmp_path):
    def nan_at(steps):
        def hook(method):
            original = method.loss

            def loss(*args, **kwargs):
                value, logs = original(*args, **kwargs)
                return (value * float("nan") if args[3] in steps else value), logs

            method.loss = loss
        return hook

    out = tmp_path / "skip"
    train(scm_args(tiny_flux, dataset, out, "--max_train_steps", "4", "--checkpointing_steps", "0"),
          method_hook=nan_at({1}))
    state = json.loads((out / "training_summary.json").read_text())
    assert state["nonfinite_skipped"] == 1 and state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in weights(out / "transformer").values())

    out = tmp_path / "stop"
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps"):
        train(scm_args(tiny_flux, dataset, out, "--max_train_steps", "8", "--checkpointing_steps", "0",
                       "--max_nonfinite_steps", "3"), method_hook=nan_at({2, 3, 4, 5}))
    assert [s for s, _ in list_checkpoints(out)] == [5]  # a checkpoint of the last good state + skips


def test_bad_inputs_give_clear_errors(tiny_flux, dataset, tmp_path):
    base = scm_args(tiny_flux, dataset, tmp_path / "x", "--max_train_steps", "1")
    without_flag = [a for a in base if a != "--allow_unrescaled_teacher"]
    with pytest.raises(ValueError, match="--rescaled_checkpoint_path is required"):
        train(without_flag)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(without_flag + ["--rescaled_checkpoint_path", str(tmp_path / "absent.pt")])
    torch.save({"module": {"proj_out.weight": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="missing keys"):
        train(without_flag + ["--rescaled_checkpoint_path", str(tmp_path / "wrong.pt")])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 but --train_batch_size is 2"):
        train(base + ["--ds_file", str(ROOT / "parallel_config" / "deepspeed_bf16_batch8.json")])
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(PermissionError, match="not writable"):
        train(scm_args(tiny_flux, dataset, blocked / "out", "--max_train_steps", "1"))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train(base + ["--resume_from_checkpoint", str(tmp_path / "nothing")])


def test_rank_streams_differ_and_are_reproducible():
    assert rank_seed(7, 0) != rank_seed(7, 1) and rank_seed(7, 1) == rank_seed(7, 1) != rank_seed(8, 1)


def test_meanflow_trains_a_dual_timestep_student_that_starts_as_the_teacher(tiny_flux, dataset, tmp_path):
    from model.transformer import FluxTransformer

    argv = [a for a in scm_args(tiny_flux, dataset, tmp_path / "mf", "--max_train_steps", "2",
                                "--checkpointing_steps", "2", "--zero_init_dual", "--use_cfg_meanflow", "True")
            if a not in ("--tangent_warmup_steps", "3")]
    final = train(argv, method="meanflow")
    student = FluxTransformer.from_pretrained(final)
    assert student.config.dual_timestep and student.config.time_input_scale == 1.0
    pt = torch.load(tmp_path / "mf" / "ckpts" / "transformer_2.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("timestep_embedder2.") for k in pt["module"])


def test_ema_is_checkpointed_resumed_and_exported(tiny_flux, dataset, tmp_path):
    out = tmp_path / "ema"
    common = ("--checkpointing_steps", "2", "--ema_decay", "0.5")
    final = weights(train(scm_args(tiny_flux, dataset, out, "--max_train_steps", "2", *common)))
    raw = load_file(out / "checkpoint-2" / "model.safetensors")  # the trained (non-EMA) student, "net." prefixed
    raw = {k[len("net."):]: v for k, v in raw.items() if k.startswith("net.")}
    assert set(raw) == set(final)
    assert any(not torch.equal(raw[k], final[k]) for k in final)  # the export holds the EMA weights
    assert any(p.name.startswith("custom_checkpoint") for p in (out / "checkpoint-2").iterdir())  # EMA state
    resumed = weights(train(scm_args(tiny_flux, dataset, out, "--max_train_steps", "3", *common,
                                     "--resume_from_checkpoint", "latest")))
    assert any(not torch.equal(resumed[k], final[k]) for k in final)


def test_the_log_is_a_bar_with_losses_and_step_time_then_one_summary_line(tiny_flux, dataset, tmp_path, capfd):
    """A step budget: a bar in steps; a time budget: a bar in minutes (not steps out of 1,000,000); then one
    summary line (stdout) with the steps, the minutes, the seconds per step and the last losses."""
    train(scm_args(tiny_flux, dataset, tmp_path / "steps", "--max_train_steps", "3"))
    captured = capfd.readouterr()
    assert "3/3" in captured.err and "s/step=" in captured.err and "loss=" in captured.err
    summary = [line for line in captured.out.splitlines() if line.startswith("sCM done: ")]
    assert len(summary) == 1 and "sCM done: 3 steps in " in summary[0] and "s/step" in summary[0]
    assert ", loss " in summary[0] and str(tmp_path / "steps" / "transformer") in summary[0]
    train(scm_args(tiny_flux, dataset, tmp_path / "minutes", "--max_train_steps", "1000000",
                   "--max_train_minutes", "0.02"))
    captured = capfd.readouterr()
    assert "sCM (0.02 min)" in captured.err and "/1000000" not in captured.err and "step=" in captured.err
    assert any(line.startswith("sCM done: ") and " min (" in line for line in captured.out.splitlines())
