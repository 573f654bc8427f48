"""The GPU-cluster launch scripts pass only flags their Python scripts accept (torchrun replaced by a checker)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECKER = f"""#!{sys.executable}
import importlib, json, sys
sys.path.insert(0, {str(ROOT)!r})
args = sys.argv[1:]
i = next(k for k, a in enumerate(args) if a.endswith(".py"))
script, rest = args[i], args[i + 1:]
module = importlib.import_module(script[:-3])
if hasattr(module, "parse_args"):
    parsed = module.parse_args(rest)
else:  # the student sampling scripts
    from evaluation.sampling import student_parser
    parsed = student_parser(module.__doc__).parse_args(rest)
print(json.dumps({{"script": script, "args": vars(parsed)}}, default=str))
"""


@pytest.fixture(scope="module")
def fake_torchrun(tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("bin")
    path = bin_dir / "torchrun"
    path.write_text(CHECKER)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def run_script(fake_torchrun, *args, env=None):
    env = {**os.environ, "PATH": f"{fake_torchrun}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ['PATH']}", "NPROC": "2", **(env or {})}
    result = subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def test_train_scm_script(fake_torchrun):
    out = run_script(fake_torchrun, "script/train_sCM.sh", "1e-6", "512", "8", "/runs/scm", "/ck/rescaled.pt")
    a = out["args"]
    assert out["script"] == "train_sCM.py"
    assert (a["learning_rate"], a["resolution"], a["train_batch_size"]) == (1e-6, 512, 8)
    assert a["output_dir"] == "/runs/scm/resolution512_bs8_lr1e-6" and a["rescaled_checkpoint_path"] == "/ck/rescaled.pt"
    assert (a["logit_mean"], a["logit_std"], a["max_grad_norm"]) == (0.2, 1.6, 0.1)
    assert a["ds_file"] == "parallel_config/deepspeed_bf16_batch8.json" and a["resume_from_checkpoint"] == "latest"


def test_train_meanflow_script(fake_torchrun):
    out = run_script(fake_torchrun, "script/train_meanflow.sh", "1e-6", "512", "8", "True", "1.0", "0.5", "0.3", "0.8",
                     "/runs/mf", "/ck/rescaled.pt")
    a = out["args"]
    assert out["script"] == "train_meanflow.py"
    assert a["use_cfg_meanflow"] is True and (a["cfg_omega"], a["cfg_kappa"], a["cfg_min_t"], a["cfg_max_t"]) == (
        1.0, 0.5, 0.3, 0.8)


def test_rescale_and_geneval_scripts(fake_torchrun):
    a = run_script(fake_torchrun, "script/rescale_teacher.sh", "/runs/rescaled")["args"]
    assert a["init"] == "remap" and a["output_dir"] == "/runs/rescaled"
    for script, target in (("script/geneval_sCM.sh", "test_sCM.py"), ("script/geneval_meanflow.sh", "test_meanflow.py")):
        out = run_script(fake_torchrun, script, "/runs/x", "3000", "1", "2")
        assert out["script"] == target
        assert out["args"]["resume_path"] == "/runs/x/ckpts/transformer_3000.pt"
        assert out["args"]["num_inference_steps"] == [1, 2]
    a = run_script(fake_torchrun, "script/geneval_flux8b.sh", "/out", "28", "3.5", "512")
    assert a["args"]["num_inference_steps"] == 28 and a["args"]["output_dir"] == "/out"


def test_train_sid_and_geneval_sid_scripts(fake_torchrun):
    out = run_script(fake_torchrun, "script/train_sid.sh", "1e-6", "512", "8", "zero_cfg", "/runs/sid")
    a = out["args"]
    assert out["script"] == "train_sid.py"
    assert (a["learning_rate"], a["resolution"], a["train_batch_size"], a["guidance_strategy"]) == (1e-6, 512, 8,
                                                                                                    "zero_cfg")
    assert a["output_dir"] == "/runs/sid/resolution512_bs8_lr1e-6_zero_cfg" and not a["rescaled_checkpoint_path"]
    assert a["num_generator_steps"] == 4 and a["fake_learning_rate"] == 1e-6 and a["gan"] is False
    assert a["ds_file"] == "parallel_config/deepspeed_bf16_batch8.json" and a["resume_from_checkpoint"] == "latest"
    out = run_script(fake_torchrun, "script/geneval_sid.sh", "/runs/sid", "5000", "1", "4")
    assert out["script"] == "test_sid.py" and out["args"]["num_inference_steps"] == [1, 4]
    assert out["args"]["resume_path"] == "/runs/sid/ckpts/transformer_5000.pt"


def test_geneval_score_script_and_the_score_chain(fake_torchrun):
    out = run_script(fake_torchrun, "script/geneval_score.sh", "/runs/x/images/global_steps0")
    assert out["script"] == "evaluate_geneval.py" and out["args"]["run_dir"] == "/runs/x/images/global_steps0"
    assert out["args"]["detector"] == "mask2former" and out["args"]["batch_size"] == 8
    env = {"SCORE": "1"}
    out = run_script(fake_torchrun, "script/geneval_sid.sh", "/runs/sid", "5000", "2", env=env)
    assert out["script"] == "evaluate_geneval.py"
    assert out["args"]["run_dir"] == "/runs/sid/GenEval/GenEval_RESOLUTION512_NFE2_cfg3.5/images/global_steps5000"
    out = run_script(fake_torchrun, "script/geneval_flux8b.sh", "/out", "28", "4", "512", env=env)
    assert out["args"]["run_dir"] == "/out/GenEval_RESOLUTION512_NFE28_cfg4.0/images/global_steps0"


def test_ci_runs_the_readme_test_command():
    """CI must fail where a user following the README fails: .ci/run is the README's test command, verbatim."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Run the tests", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [block]
    quickstart = readme.split("## Two commands for a fresh machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert quickstart.strip() == "bash script/quickstart.sh"
