"""A user's mistakes get one line on stderr and exit status 2 from every entry script; bugs keep their traceback.

Each case runs the real script in a subprocess (two at a time: most of the cost is importing the stack).
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tiny_flux, tmp_path_factory):
    from data.synthetic import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("cli")
    dataset = make_synthetic_dataset(tmp / "data", num_images=4, resolution=32, seed=0)
    (tmp / "notes.pt").write_text("these are notes, not weights\n")
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "empty_prompts.txt").write_text("\n\n")
    (tmp / "prompts.txt").write_text("a photo of a red circle\na photo of two squares\n")
    (tmp / "not_geneval").mkdir()
    (tmp / "not_geneval" / "image.png").write_bytes(b"")
    (tmp / "geneval" / "00000" / "samples").mkdir(parents=True)
    (tmp / "geneval" / "00000" / "metadata.jsonl").write_text(json.dumps({"tag": "single_object", "prompt": "a cat",
                                                                          "include": [{"class": "cat", "count": 1}]}))
    Image.new("RGB", (16, 16)).save(tmp / "geneval" / "00000" / "samples" / "0000.png")
    growing = tmp / "growing_teacher"  # a toy teacher build given another cycle: its summary waits in build/
    for part in ("build", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer",
                 "vae"):
        (growing / part).mkdir(parents=True)
    (growing / "model_index.json").write_text("{}")
    (growing / "build" / "toy_teacher_cycles1.json").write_text("{}")
    two_process = tmp / "run2" / "checkpoint-2"  # what a 2-process run leaves (the check reads only this file)
    two_process.mkdir(parents=True)
    (two_process / "trainer_state.json").write_text(json.dumps({"global_step": 2, "num_processes": 2}))
    return {"flux": str(tiny_flux), "data": str(dataset), "tmp": tmp}


def train_args(f, **overrides):
    args = {"--pretrained_model_name_or_path": f["flux"], "--allow_unrescaled_teacher": None,
            "--dataset_name": f["data"], "--resolution": "32", "--train_batch_size": "2",
            "--max_sequence_length": "16", "--report_to": "none", "--max_train_steps": "1",
            "--output_dir": str(f["tmp"] / "out"), **overrides}
    return [x for k, v in args.items() if v is not False for x in ([k] if v is None else [k, v])]


def sid_args(f, overrides=None):
    """train_sid.py flags, data-free from a prompts file; `overrides` maps a flag to its value, None (a switch) or
    False (dropped)."""
    args = {"--pretrained_model_name_or_path": f["flux"], "--prompts_file": str(f["tmp"] / "prompts.txt"),
            "--resolution": "32", "--train_batch_size": "2", "--max_sequence_length": "16", "--report_to": "none",
            "--max_train_steps": "1", "--output_dir": str(f["tmp"] / "sid"), **(overrides or {})}
    return [x for k, v in args.items() if v is not False for x in ([k] if v is None else [k, v])]


def sample_args(f, **overrides):
    args = {"--pretrained_model_name_or_path": f["flux"], "--resolution": "64", "--limit": "1",
            "--max_sequence_length": "16", "--output_dir": str(f["tmp"] / "samples"), **overrides}
    return [x for k, v in args.items() for x in [k, v]]


# (name, argv after the interpreter, a fragment the error line must contain): run end to end, in subprocesses
def cases(f):
    tmp = f["tmp"]
    return [
        ("model path missing", ["train_sCM.py", *train_args(f, **{"--pretrained_model_name_or_path": "/no/such/flux"})],
         "does not exist"),
        ("dataset path missing", ["train_sCM.py", *train_args(f, **{"--dataset_name": str(tmp / "no" / "data")})],
         "--dataset_name"),
        ("ds_file missing", ["train_sCM.py", *train_args(f, **{"--ds_file": str(tmp / "ds.json")})], "--ds_file"),
        ("caption column missing", ["train_meanflow.py", *train_args(f, **{"--caption_column": "text"})],
         "--caption_column"),
        ("negative learning rate", ["train_sCM.py", *train_args(f, **{"--learning_rate": "-1"})], "--learning_rate"),
        ("zero batch size", ["train_rescale.py", *train_args(f, **{"--train_batch_size": "0"})], "--train_batch_size"),
        ("resolution not a multiple of 16", ["train_sCM.py", *train_args(f, **{"--resolution": "72"})],
         "multiple of 16"),
        ("resume folder missing", ["train_sCM.py", *train_args(f, **{"--resume_from_checkpoint": str(tmp / "nope")})],
         "not a complete checkpoint"),
        ("resume with another number of processes",
         ["train_sCM.py", *train_args(f, **{"--output_dir": str(tmp / "run2"), "--resume_from_checkpoint": "latest"})],
         "written by 2 processes"),
        ("zero sampling steps", ["test_flux8b.py", *sample_args(f, **{"--num_inference_steps": "0"})],
         "--num_inference_steps"),
        ("negative guidance", ["test_flux8b.py", *sample_args(f, **{"--guidance_scale": "-2"})], "--guidance_scale"),
        ("zero prompts", ["test_flux8b.py", *sample_args(f, **{"--limit": "0"})], "--limit"),
        ("zero images per prompt", ["test_meanflow.py", *sample_args(f, **{"--images_per_prompt": "0",
                                                                             "--resume_path": "x.pt"})],
         "--images_per_prompt"),
        ("student checkpoint is a text file",
         ["test_sCM.py", *sample_args(f, **{"--resume_path": str(tmp / "notes.pt")})], "not a file written by torch.save"),
        ("scoring a folder that is not GenEval layout", ["-m", "toyworld.scorer", str(tmp / "not_geneval")],
         "not a GenEval-layout folder"),
    ]


# the same check in this process (the same `run` boundary, without a new interpreter): (module, argv, fragment)
def more_cases(f):
    tmp = f["tmp"]
    return [
        ("train_meanflow", train_args(f, **{"--allow_unrescaled_teacher": False,
                                            "--rescaled_checkpoint_path": str(tmp / "notes.pt")}),
         "not a file written by torch.save"),
        ("train_sCM", train_args(f, **{"--allow_unrescaled_teacher": False}), "--rescaled_checkpoint_path is required"),
        ("train_rescale", train_args(f) + ["--time_mixture", "gaussian:1"], "--time_mixture"),
        ("train_rescale", train_args(f) + ["--guidance_min", "5", "--guidance_max", "2"], "--guidance_min"),
        ("train_sCM", train_args(f, **{"--ema_decay": "1.5"}), "--ema_decay"),
        ("train_sCM", train_args(f, **{"--seed": "-1"}), "--seed"),
        ("train_sCM", train_args(f, **{"--gradient_accumulation_steps": "0"}), "--gradient_accumulation_steps"),
        ("train_sCM", train_args(f, **{"--report_to": "mlflowx"}), "--report_to"),
        ("train_sCM", train_args(f, **{"--data_files": str(tmp / "none.parquet"), "--dataset_name": False}),
         "matches no file"),
        ("train_meanflow", train_args(f, **{"--cfg_prob": "1.5"}), "--cfg_prob"),
        ("train_sCM", train_args(f, **{"--output_dir": str(tmp / "notes.pt" / "out")}), "not writable"),
        ("test_flux8b", sample_args(f, **{"--metadata_file": str(tmp / "empty.jsonl")}), "no prompts"),
        ("test_flux8b", sample_args(f, **{"--prompts_file": str(tmp / "empty_prompts.txt")}), "no prompts"),
        ("test_flux8b", sample_args(f, **{"--prompts_file": str(tmp / "absent.txt")}), "does not exist"),
        ("test_flux8b", sample_args(f, **{"--resolution": "100"}), "multiple of 16"),
        ("test_meanflow", sample_args(f, **{"--resume_path": str(tmp / "x.pt")}), "does not exist"),
        ("test_sCM", sample_args(f, **{"--resume_path": str(tmp / "x.pt"), "--num_inference_steps": "-1"}),
         "--num_inference_steps"),
        ("train_sid", sid_args(f, {"--gan": None}), "drop --prompts_file"),
        ("train_sid", sid_args(f, {"--gan": None, "--prompts_file": False}), "--gan needs real"),
        ("train_sid", sid_args(f, {"--num_generator_steps": "0"}), "--num_generator_steps"),
        ("train_sid", sid_args(f, {"--guidance_strategy": "more_cfg"}), "--guidance_strategy"),
        ("train_sid", sid_args(f, {"--prompts_file": str(tmp / "empty_prompts.txt")}), "holds no prompt"),
        ("train_sid", sid_args(f, {"--kappa2": "2", "--kappa3": "1"}), "kappa2"),
        ("test_sid", sample_args(f, **{"--resume_path": str(tmp / "notes.pt"), "--noise_type": "blue"}),
         "--noise_type"),
        ("evaluate_geneval.py", [str(tmp / "not_geneval"), "--detector", "toy"], "not a GenEval-layout folder"),
        ("evaluate_geneval.py", [str(tmp / "geneval"), "--detector", "yolo"], "--detector"),
        ("evaluate_geneval.py", [str(tmp / "geneval"), "--detector_model", "facebook/no-such-model"],
         "could not be loaded (HF_HUB_OFFLINE is set"),
        ("script/make_tiny_flux.py", ["--output_dir", str(tmp / "t"), "--size", "huge"], "--size"),
        ("toyworld.world", ["dataset", "--output_dir", str(tmp / "w"), "--num_images", "0"], "--num_images"),
        ("toyworld.world", ["eval", "--output", str(tmp / "e.jsonl"), "--per_tag", "0"], "--per_tag"),
        ("data.synthetic", ["--output_dir", str(tmp / "s"), "--num_images", "-3"], "--num_images"),
        ("script/toy_benchmark.py", ["--mode", "smoke", "--teacher_dir", str(tmp / "none"), "--output_dir",
                                     str(tmp / "bench")], "--teacher_dir"),
        ("script/toy_benchmark.py", ["--mode", "smoke", "--teacher_dir", str(tmp / "growing_teacher"),
                                     "--output_dir", str(tmp / "bench")],
         "not a finished toy teacher (missing toy_teacher.json)"),
        ("script/bench_train_step.py", ["--pretrained_model_name_or_path", str(tmp / "none" / "x" / "y")],
         "does not exist"),
    ]


def run(argv, extra_env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT)}
    env.pop("FLUX_DISTILL_DEBUG", None)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def error_problems(returncode, stderr, fragment) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    problems = []
    if returncode != 2:
        problems.append(f"exit status {returncode}")
    if "Traceback" in stderr:
        problems.append("a traceback")
    if not lines or ": error: " not in lines[-1] or fragment not in lines[-1]:
        problems.append(f"last line {lines[-1] if lines else ''!r} lacks {fragment!r}")
    if sum(": error: " in line for line in lines) != 1:
        problems.append("not exactly one error line")
    if "requires torchvision" in stderr:
        problems.append("transformers' torchvision notice")
    return problems


def test_user_errors_are_one_line_with_exit_status_2(files):
    table = cases(files)
    assert len(table) >= 15
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run(case[1]), table))
    failures = [f"{name}: {', '.join(problems)}\n{result.stderr[-1500:]}"
                for (name, _, fragment), result in zip(table, results)
                if (problems := error_problems(result.returncode, result.stderr, fragment))]
    assert not failures, "\n\n".join(failures)


def load_entry(name: str):
    """The `main` of an entry script (root or script/ file) or of a module with a CLI."""
    import importlib
    import importlib.util

    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(name).stem + "_cli_test", ROOT / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main
    return importlib.import_module(name).main


def refuse_model_loading(monkeypatch):
    """Loading any diffusers model or pipeline raises: the input checks must come first. (Class attributes, looked
    up at each call: patching a function that modules import by name would outlive the test in those modules.)"""
    import diffusers

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(loaded))


def test_more_user_errors_are_one_line_with_exit_status_2(files, capsys, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    from common.cli import run as run_cli

    monkeypatch.delenv("FLUX_DISTILL_DEBUG", raising=False)
    refuse_model_loading(monkeypatch)  # every mistake here is refused before a model is loaded
    failures = []
    for name, argv, fragment in more_cases(files):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        try:
            with pytest.raises(SystemExit) as exit_info:
                run_cli(load_entry(name), argv)
        except AssertionError as err:
            failures.append(f"{name} {argv[-2:]}: {err}")
            continue
        stderr = capsys.readouterr().err
        if problems := error_problems(exit_info.value.code, stderr, fragment):
            failures.append(f"{name} {argv[-2:]}: {', '.join(problems)}\n{stderr[-800:]}")
    assert not failures, "\n\n".join(failures)


def test_debug_shows_the_traceback_of_a_user_error(files, monkeypatch):
    from common.cli import UsageError
    from common.cli import run as run_cli

    argv = sample_args(files, **{"--pretrained_model_name_or_path": "/no/flux"})
    result = run(["test_flux8b.py", *argv, "--debug"])
    assert "Traceback" in result.stderr and "MissingPathError" in result.stderr
    monkeypatch.setenv("FLUX_DISTILL_DEBUG", "1")
    with pytest.raises(UsageError):
        run_cli(load_entry("test_flux8b.py"), argv)


def test_a_bug_keeps_its_traceback(tmp_path):
    """An exception that is not a user error is not reduced to one line."""
    script = tmp_path / "buggy.py"
    script.write_text("from common.cli import run\n\ndef main(argv):\n    raise KeyError('internal state')\n\n"
                      "run(main)\n")
    result = run([str(script)])
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError" in result.stderr


def test_only_the_torchvision_notices_are_dropped():
    import logging

    import common.cli  # noqa: F401  (installs the filter)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.utils.import_utils")
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`")
        logger.warning("a warning that matters")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["a warning that matters"]


def test_loading_a_pipeline_prints_no_library_chatter(tiny_flux):
    """No loading bars (seven for a FLUX pipeline, one per model's weights), no notice that lists no float32 module,
    no DeepSpeed notice that it runs on the CPU; a warning naming real float32 modules would still show."""
    code = (
        "import sys, torch\n"
        "from model.loading import load_transformer\n"
        "from model.pipeline import FluxEulerPipeline\n"
        f"t = load_transformer({str(tiny_flux)!r}, dtype=torch.bfloat16)\n"
        f"p = FluxEulerPipeline.from_pretrained({str(tiny_flux)!r}, transformer=t, dtype=torch.bfloat16)\n"
        "t.to(torch.float32)\n"
        "import logging; logging.getLogger('diffusers.models.modeling_utils').warning("
        "'There are modules in X that should be kept in float32: [\\'a\\'].')\n"
        "print('loaded', file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["There are modules in X that should be kept in float32: ['a'].", "loaded"], out.stderr
