"""Benchmark one distillation training step against one teacher forward, side by side in one run.

    python script/bench_train_step.py --method scm [--pretrained_model_name_or_path DIR] [--batch_size 2]

Without a model path it builds the `small` tiny FLUX (5.2M parameters, 1024 image tokens at 512 px) in a
temporary folder. Each configuration runs in its own subprocess so that its peak memory is its own:
  teacher_forward  one no-grad forward of the frozen teacher on the batch (the unit of cost)
  ours             the full training step: loss (teacher, JVP, student forward) + backward + AdamW
                   (MeanFlow: with CFG-MeanFlow on and r != t, its most expensive setting)
  reference_attn   the same step with the reference's choice of math attention for every student pass
                   (its "vanilla" processors), instead of fused attention outside the JVP
Prints seconds per step, peak memory (CUDA allocator peak on GPU, process peak RSS on CPU) and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ("teacher_forward", "ours", "reference_attn")


def build_inputs(model_dir: str, batch: int, resolution: int, text_len: int, device):
    import torch

    from model.latents import image_ids
    from model.text import PromptEmbeds
    from model.transformer import FluxTransformer

    config = FluxTransformer.load_config(model_dir, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    h = w = resolution // 8
    x0 = torch.randn(batch, (h // 2) * (w // 2), 64, generator=g).to(device)
    cond = PromptEmbeds(torch.randn(batch, text_len, config["joint_attention_dim"], generator=g).to(device),
                        torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device),
                        torch.zeros(text_len, 3, device=device))
    return x0, cond, image_ids(h, w, device=device)


def _student_attention(net, reference_attention: bool) -> None:
    """Ours: fused attention, math only while JVP tangents flow; the reference: math attention everywhere."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from model.attention import use_jvp_attention

    if reference_attention:  # per processor: set_attention_backend() would also switch the teacher's default
        for processor in net.attn_processors.values():
            processor._attention_backend = AttentionBackendName._NATIVE_MATH
    else:
        use_jvp_attention(net)


def scm_step_fn(model_dir, x0, cond, img_ids, device, reference_attention: bool):
    import torch

    from model.loading import load_transformer
    from model.scm import SCMConfig, TrigFlowModel, scm_loss

    teacher = TrigFlowModel(load_transformer(model_dir, time_input_scale=1.0).to(device)).requires_grad_(False)
    net = load_transformer(model_dir, time_input_scale=1.0).to(device)
    _student_attention(net, reference_attention)
    student = TrigFlowModel(net, logvar_head=True).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    config = SCMConfig(tangent_warmup_steps=0)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss, _ = scm_loss(student, teacher, x0, cond, img_ids, 100, config, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad():
            teacher(x0, torch.full((x0.shape[0],), 0.7, device=device), torch.full((x0.shape[0],), 4.0, device=device),
                    cond, img_ids)

    return step, teacher_forward


def meanflow_step_fn(model_dir, x0, cond, img_ids, device, reference_attention: bool):
    import torch

    from model.loading import load_transformer
    from model.meanflow import MeanFlowConfig, meanflow_loss
    from model.transformer import flux_velocity

    teacher = load_transformer(model_dir, time_input_scale=1.0).to(device).requires_grad_(False)
    student = load_transformer(model_dir, time_input_scale=1.0, dual_timestep=True).to(device)
    _student_attention(student, reference_attention)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    config = MeanFlowConfig(use_cfg_meanflow=True, cfg_kappa=0.5, ratio_r_not_equal_t=1.0)
    neg = cond.index(slice(0, 1))
    generator = torch.Generator().manual_seed(0)

    def step():
        loss, _ = meanflow_loss(student, teacher, x0, cond, neg, img_ids, config, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad():
            b = x0.shape[0]
            flux_velocity(teacher, x0, torch.full((b,), 0.7, device=device), torch.full((b,), 4.0, device=device), cond,
                     img_ids)

    return step, teacher_forward


METHODS = {"scm": scm_step_fn, "meanflow": meanflow_step_fn}


def measure(args) -> dict:
    """Run one configuration in this process and return its timings and peak memory."""
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x0, cond, img_ids = build_inputs(args.pretrained_model_name_or_path, args.batch_size, args.resolution,
                                     args.max_sequence_length, device)
    step, teacher_forward = METHODS[args.method](args.pretrained_model_name_or_path, x0, cond, img_ids, device,
                                                 reference_attention=args.config == "reference_attn")
    fn = teacher_forward if args.config == "teacher_forward" else step
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"config": args.config, "seconds": statistics.median(times), "peak_mib": peak, "device": device.type}


def main(argv=None) -> None:
    from common.cli import ArgumentParser, check_pretrained_model, positive_int, resolution

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHODS), default="scm")
    parser.add_argument("--pretrained_model_name_or_path", default=None)
    parser.add_argument("--batch_size", type=positive_int, default=2)
    parser.add_argument("--resolution", type=resolution, default=512)
    parser.add_argument("--max_sequence_length", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--config", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pretrained_model_name_or_path:
        check_pretrained_model(args.pretrained_model_name_or_path)
    if args.config:
        print(json.dumps(measure(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.pretrained_model_name_or_path is None:
            from model.tiny_flux import build_tiny_flux

            args.pretrained_model_name_or_path = str(build_tiny_flux(Path(tmp) / "small-flux", size="small"))
        results = {}
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--config", config] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("config", "debug") and v is not None]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:
                raise SystemExit(f"{config} failed:\n{out.stderr[-3000:]}")
            results[config] = json.loads(out.stdout.strip().splitlines()[-1])
    unit = results["teacher_forward"]["seconds"]
    print(f"method {args.method} | batch {args.batch_size} x {(args.resolution // 16) ** 2} image tokens + "
          f"{args.max_sequence_length} text tokens | device {results['ours']['device']} | "
          f"median of {args.repeats}")
    print(f"{'config':<16} {'s/step':>9} {'x teacher fwd':>14} {'peak MiB':>10}")
    for config in CONFIGS:
        r = results[config]
        print(f"{config:<16} {r['seconds']:>9.3f} {r['seconds'] / unit:>14.2f} {r['peak_mib']:>10.0f}")
    ours, ref = results["ours"], results["reference_attn"]
    print(f"ours vs reference attention: {ref['seconds'] / ours['seconds']:.2f}x faster, "
          f"{ours['peak_mib'] / ref['peak_mib']:.2f}x the peak memory")


if __name__ == "__main__":
    from common.cli import run

    run(main)
