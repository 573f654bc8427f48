"""End to end: test_flux8b.py on the tiny FLUX, batched, resumed and under torchrun with 2 processes.

Images are bitwise equal whatever the batch size and the number of processes *at the same number of threads per
process*: CPU matrix kernels may change the last bit with the thread count (seen on AMD EPYC), and torchrun gives
each worker OMP_NUM_THREADS=1 when it is unset. So every run here is compared at one thread per process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd=ROOT, launcher=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + args
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def pngs(out):
    run_folder = next(Path(out).glob("GenEval_RESOLUTION64_NFE4_cfg3.5/images/global_steps0"))
    return {p.relative_to(run_folder): p.read_bytes() for p in sorted(run_folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def teacher_run(tiny_flux, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "b1"
    args = ["test_flux8b.py", "--pretrained_model_name_or_path", str(tiny_flux), "--resolution", "64", "--limit", "3",
            "--num_inference_steps", "4", "--max_sequence_length", "32", "--output_dir", str(out)]
    run(args + ["--batch_size", "1"])
    return args, out


def test_teacher_writes_geneval_layout_and_resumes(teacher_run):
    args, out = teacher_run
    images = pngs(out)
    assert len(images) == 12
    assert {str(p.parent.parent) for p in images} == {"00000", "00001", "00002"}
    assert len(set(images.values())) == 12  # 12 different images
    again = run(args + ["--batch_size", "1"])
    assert "wrote 0 prompt folders, skipped 3" in again.stdout


def test_teacher_images_do_not_depend_on_batch_size(teacher_run, tmp_path):
    args, out = teacher_run
    run([a if a != str(out) else str(tmp_path / "b3") for a in args] + ["--batch_size", "3"])
    assert pngs(tmp_path / "b3") == pngs(out)


def test_teacher_images_do_not_depend_on_the_number_of_processes(teacher_run, tmp_path):
    args, out = teacher_run
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    run([a if a != str(out) else str(tmp_path / "tr") for a in args], launcher=torchrun)
    assert pngs(tmp_path / "tr") == pngs(out)


def test_scm_student_script_samples_1_2_4_steps_from_a_reference_checkpoint(tiny_flux, tmp_path):
    """A reference-style student .pt ({"module": ...} with the training-only logvar head) loads as it is."""
    import torch

    from model.loading import load_transformer

    state = load_transformer(str(tiny_flux), time_input_scale=1.0).state_dict()
    state.update({"logvar_linear.weight": torch.zeros(1, 32), "logvar_linear.bias": torch.zeros(1)})
    ckpt = tmp_path / "ckpts" / "transformer_1500.pt"
    ckpt.parent.mkdir()
    torch.save({"module": state}, ckpt)
    out = tmp_path / "geneval"
    run(["test_sCM.py", "--pretrained_model_name_or_path", str(tiny_flux), "--resume_path", str(ckpt),
         "--num_inference_steps", "1", "2", "4", "--resolution", "64", "--limit", "2", "--max_sequence_length", "16",
         "--output_dir", str(out)])
    for nfe in (1, 2, 4):
        folder = out / f"GenEval_RESOLUTION64_NFE{nfe}_cfg3.5" / "images" / "global_steps1500"
        assert len(list(folder.glob("0000[01]/samples/*.png"))) == 8, nfe


def test_meanflow_student_script_loads_a_reference_dual_timestep_checkpoint(tiny_flux, tmp_path):
    import torch

    from model.loading import load_transformer

    student = load_transformer(str(tiny_flux), time_input_scale=1.0, dual_timestep=True)
    ckpt = tmp_path / "transformer_2000.pt"
    torch.save({"module": student.state_dict()}, ckpt)
    out = tmp_path / "geneval"
    run(["test_meanflow.py", "--pretrained_model_name_or_path", str(tiny_flux), "--resume_path", str(ckpt),
         "--num_inference_steps", "1", "4", "--resolution", "64", "--limit", "1", "--max_sequence_length", "16",
         "--output_dir", str(out)])
    for nfe in (1, 4):
        folder = out / f"GenEval_RESOLUTION64_NFE{nfe}_cfg3.5" / "images" / "global_steps2000" / "00000"
        assert len(list((folder / "samples").glob("*.png"))) == 4
