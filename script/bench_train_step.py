"""Benchmark one distillation training step against one teacher forward, side by side in one run.

    python script/bench_train_step.py --method scm|meanflow|sid [--pretrained_model_name_or_path DIR] [--batch_size 2]

Without a model path it builds the `small` tiny FLUX (5.2M parameters, 1024 image tokens at 512 px) in a
temporary folder. Each configuration runs in its own subprocess so that its peak memory is its own:
  teacher_forward  one no-grad forward of the frozen teacher on the batch (the unit of cost)
  ours             the full training step: loss (teacher, JVP, student forward) + backward + AdamW
                   (MeanFlow: with CFG-MeanFlow on and r != t, its most expensive setting)
  reference_attn   the same step with the reference's choice of math attention for every student pass
                   (its "vanilla" processors), instead of fused attention outside the JVP
SiD (--method sid) instead measures one whole iteration (fake-score update, then generator update, both Adam
steps) at k = 1..4 generator steps (K = 4; the mean k is their average) beside the floor its calls imply, built
from units measured on the same model and batch:
  teacher_forward  F: a no-grad forward
  train_forward    T: forward + backward to the parameters + an Adam step (a trained network's update)
  input_backward   I: forward + backward to the input only (a frozen network the generator's loss passes through)
  floor(k) = (2k - 1) F (k + k - 1 no-grad generator steps) + 2 T (fake score, generator) + 2 I (teacher, fake
  score in the generator loss), with every kappa = 1 (LSG's default: one pass per network).
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
SID_CONFIGS = ("teacher_forward", "train_forward", "input_backward", "sid_k1", "sid_k2", "sid_k3", "sid_k4")


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


def sid_step_fn(model_dir, x0, cond, img_ids, device, config_name: str):
    """SiD's iteration at a fixed k (the same functions train_sid.py calls), or one of the floor's units."""
    import torch

    from model.loading import load_transformer
    from model.sid import SiDConfig, fake_score_objective, generate, generator_objective
    from model.transformer import flux_velocity

    teacher = load_transformer(model_dir).to(device).requires_grad_(False)
    fake, generator_net = load_transformer(model_dir).to(device), load_transformer(model_dir).to(device)
    optimizers = [torch.optim.AdamW(n.parameters(), lr=1e-6, betas=(0.0, 0.999), weight_decay=0.0)
                  for n in (fake, generator_net)]
    config = SiDConfig(num_generator_steps=4)
    empty = cond.index(slice(0, 1))
    g = torch.Generator().manual_seed(0)
    b = x0.shape[0]

    def randn():
        return torch.randn(x0.shape, generator=g).to(device)

    def draws():
        return torch.rand(b, generator=g).to(device), randn()

    def iteration(k):
        x_g = generate(generator_net, randn(), k, cond, img_ids, config, lambda i: randn(), grad=False)
        loss, _ = fake_score_objective(fake, x_g, *draws(), cond, empty, img_ids, config)
        loss.backward()
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)
        fake.requires_grad_(False)
        x_g = generate(generator_net, randn(), k, cond, img_ids, config, lambda i: randn(), grad=True)
        loss, _ = generator_objective(teacher, fake, x_g, *draws(), cond, empty, img_ids, config)
        loss.backward()
        optimizers[1].step()
        optimizers[1].zero_grad(set_to_none=True)
        fake.requires_grad_(True)

    def velocity(net, x):
        return flux_velocity(net, x, torch.full((b,), 0.7, device=device), torch.full((b,), 3.5, device=device),
                             cond, img_ids)

    def teacher_forward():
        with torch.no_grad():
            velocity(teacher, x0)

    def train_forward():
        velocity(fake, x0).square().mean().backward()
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)

    def input_backward():
        x = x0.clone().requires_grad_(True)
        velocity(teacher, x).square().mean().backward()

    if config_name.startswith("sid_k"):
        return lambda: iteration(int(config_name[len("sid_k"):])), teacher_forward
    return {"train_forward": train_forward, "input_backward": input_backward}.get(config_name, teacher_forward), \
        teacher_forward


METHODS = {"scm": scm_step_fn, "meanflow": meanflow_step_fn, "sid": sid_step_fn}


def measure(args) -> dict:
    """Run one configuration in this process and return its timings and peak memory."""
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x0, cond, img_ids = build_inputs(args.pretrained_model_name_or_path, args.batch_size, args.resolution,
                                     args.max_sequence_length, device)
    if args.method == "sid":
        step, teacher_forward = sid_step_fn(args.pretrained_model_name_or_path, x0, cond, img_ids, device, args.config)
    else:
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
    parser.add_argument("--config", choices=sorted(set(CONFIGS + SID_CONFIGS)), default=None, help=argparse.SUPPRESS)
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
        for config in SID_CONFIGS if args.method == "sid" else CONFIGS:
            cmd = [sys.executable, __file__, "--config", config] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("config", "debug") and v is not None]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:
                raise SystemExit(f"{config} failed:\n{out.stderr[-3000:]}")
            results[config] = json.loads(out.stdout.strip().splitlines()[-1])
    unit = results["teacher_forward"]["seconds"]
    print(f"method {args.method} | batch {args.batch_size} x {(args.resolution // 16) ** 2} image tokens + "
          f"{args.max_sequence_length} text tokens | device {results['teacher_forward']['device']} | "
          f"median of {args.repeats}")
    if args.method == "sid":
        report_sid(results)
        return
    print(f"{'config':<16} {'s/step':>9} {'x teacher fwd':>14} {'peak MiB':>10}")
    for config in CONFIGS:
        r = results[config]
        print(f"{config:<16} {r['seconds']:>9.3f} {r['seconds'] / unit:>14.2f} {r['peak_mib']:>10.0f}")
    ours, ref = results["ours"], results["reference_attn"]
    print(f"ours vs reference attention: {ref['seconds'] / ours['seconds']:.2f}x faster, "
          f"{ours['peak_mib'] / ref['peak_mib']:.2f}x the peak memory")


def report_sid(results: dict) -> None:
    """SiD's iterations in teacher forwards beside the floor of their calls, and peak memory."""
    F, T, B = (results[c]["seconds"] for c in ("teacher_forward", "train_forward", "input_backward"))
    print(f"{'config':<16} {'s/iter':>9} {'x teacher fwd':>14} {'floor (x fwd)':>14} {'vs floor':>9} {'peak MiB':>10}")
    for config in ("teacher_forward", "train_forward", "input_backward"):
        r = results[config]
        print(f"{config:<16} {r['seconds']:>9.3f} {r['seconds'] / F:>14.2f} {'':>14} {'':>9} {r['peak_mib']:>10.0f}")
    rows = []
    for k in (1, 2, 3, 4):
        r = results[f"sid_k{k}"]
        floor = (2 * k - 1) * F + 2 * T + 2 * B
        rows.append((r["seconds"], floor, r["peak_mib"]))
        print(f"{'sid k=' + str(k):<16} {r['seconds']:>9.3f} {r['seconds'] / F:>14.2f} {floor / F:>14.2f} "
              f"{r['seconds'] / floor:>9.3f} {r['peak_mib']:>10.0f}")
    mean = [sum(v) / 4 for v in zip(*rows)]
    print(f"{'sid mean k':<16} {mean[0]:>9.3f} {mean[0] / F:>14.2f} {mean[1] / F:>14.2f} {mean[0] / mean[1]:>9.3f} "
          f"{max(r[2] for r in rows):>10.0f}")
    print(f"floor(k) = (2k - 1) F + 2 T + 2 I with F {F:.3f} s, T {T:.3f} s ({T / F:.2f} F), "
          f"I {B:.3f} s ({B / F:.2f} F); goal: within 1.15x of the floor")


if __name__ == "__main__":
    from common.cli import run

    run(main)
