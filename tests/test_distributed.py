"""Two real processes (torchrun, gloo on CPU): plain DDP and DeepSpeed ZeRO-2, each resumed exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), num_images=12, resolution=32, seed=1)


def torchrun(script, args, port):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           script, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def exported(out):
    return load_file(Path(out) / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("script,engine", [("train_sCM.py", "ddp"), ("train_sCM.py", "deepspeed"),
                                           ("train_meanflow.py", "deepspeed")])
def test_two_processes_train_and_resume_exactly(tiny_flux, dataset, tmp_path, script, engine):
    common = ["--pretrained_model_name_or_path", str(tiny_flux), "--allow_unrescaled_teacher",
              "--dataset_name", str(dataset), "--resolution", "32", "--train_batch_size", "2",
              "--max_sequence_length", "16", "--dataloader_num_workers", "0", "--report_to", "none",
              "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--max_grad_norm", "0.1", "--seed", "3"]
    if engine == "deepspeed":
        config = json.loads((ROOT / "parallel_config" / "deepspeed_bf16_batch4.json").read_text())
        config["train_micro_batch_size_per_gpu"] = 2
        (tmp_path / "ds.json").write_text(json.dumps(config))
        common += ["--ds_file", str(tmp_path / "ds.json")]
    if script == "train_meanflow.py":
        common += ["--use_cfg_meanflow", "True", "--cfg_kappa", "0.5"]
    port = {"ddp": 29620, "deepspeed": 29640}[engine] + (10 if script == "train_meanflow.py" else 0)
    torchrun(script, common + ["--output_dir", str(tmp_path / "straight"), "--max_train_steps", "3"], port)
    torchrun(script, common + ["--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "2"], port + 1)
    log = torchrun(script, common + ["--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "3",
                                     "--resume_from_checkpoint", "latest"], port + 2)
    assert "resumed from" in log.stderr

    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "rank_state_0.pt").exists() and (checkpoint / "rank_state_1.pt").exists()
    summary = json.loads((tmp_path / "straight" / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 3
    assert summary["effective_max_grad_norm"] == 0.1  # DeepSpeed clips with the CLI value, not "auto" = 1.0
    a, b = exported(tmp_path / "straight"), exported(tmp_path / "resumed")
    start = load_file(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k].float(), start[k].float()) for k in start)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sid_two_processes_ddp_and_zero2_resume_exactly_and_agree(tiny_flux, dataset, tmp_path):
    """Two trained networks (generator and fake score, one engine each) under DDP and DeepSpeed ZeRO-2, with the
    Diffusion-GAN on (step 0: L_G only, step 1: L_G + L_adv): a run resumed from its step-1 checkpoint equals the
    straight run bitwise; every rank draws the same k; and fp32 ZeRO-2 agrees with DDP (same math, other
    reduction order)."""
    import shutil

    common = ["--pretrained_model_name_or_path", str(tiny_flux), "--dataset_name", str(dataset), "--gan",
              "--gan_generator_start_images", "0", "--gan_adv_start_images", "4", "--resolution", "32",
              "--train_batch_size", "2", "--max_sequence_length", "16", "--dataloader_num_workers", "0",
              "--report_to", "none", "--learning_rate", "1e-3", "--checkpointing_steps", "1", "--seed", "3",
              "--num_generator_steps", "3", "--max_train_steps", "2", "--fake_max_grad_norm", "0.5"]
    base = json.loads((ROOT / "parallel_config" / "deepspeed_bf16_batch4.json").read_text())
    configs = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        config = {**base, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": bf16}}
        configs[name] = tmp_path / f"ds_{name}.json"
        configs[name].write_text(json.dumps(config))
    engines = {"ddp": [], "zero2": ["--ds_file", str(configs["bf16"])]}
    for port, (engine, flags) in zip((29660, 29670), engines.items()):
        straight, resumed = tmp_path / engine, tmp_path / f"{engine}_resumed"
        torchrun("train_sid.py", common + flags + ["--output_dir", str(straight)], port)
        shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
        log = torchrun("train_sid.py", common + flags + ["--output_dir", str(resumed), "--resume_from_checkpoint",
                                                          "latest"], port + 1)
        assert "resumed from" in log.stderr
        a, b = exported(straight), exported(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a), engine
        ranks = [torch.load(straight / "checkpoint-2" / f"rank_state_{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0]["method"]["k_history"] == ranks[1]["method"]["k_history"] != []
        summary = json.loads((straight / "training_summary.json").read_text())
        assert summary["effective_max_grad_norm"] == {"fake_score": 0.5, "generator": 1.0}, engine
    torchrun("train_sid.py", common + ["--ds_file", str(configs["fp32"]), "--output_dir", str(tmp_path / "zero2_fp32"),
                                       "--checkpointing_steps", "0"], 29680)
    start = load_file(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors")
    ddp, zero2 = exported(tmp_path / "ddp"), exported(tmp_path / "zero2_fp32")
    moved = sum((ddp[k].double() - start[k].double()).norm() ** 2 for k in start) ** 0.5
    apart = sum((ddp[k].double() - zero2[k].double()).norm() ** 2 for k in start) ** 0.5
    assert moved > 0 and apart < 1e-3 * moved, (apart, moved)
