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
