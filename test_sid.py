"""Sample GenEval prompts with a SiD generator in 1, 2 or 4 steps into the GenEval layout.

    python test_sid.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --resume_path out/sid/ckpts/transformer_5000.pt --num_inference_steps 1 2 4 --output_dir outputs/sid

--resume_path takes our exports (diffusers folder or ckpts/transformer_<k>.pt); the generator's sampling settings
(its K, t_init, time shift, noise type, guidance embedding and time-input scale) are read from the export, and
each can be overridden. N steps run the first N times of the K-step schedule t_i = t_init (1 - i/K) that the
uniform-mixture training made into N-step samplers. Batched, sharded under torchrun, resumable and seeded per
image like test_flux8b.py.
"""

from common.cli import UsageError, nonnegative_float, positive_float, positive_int, run, str2bool
from evaluation.sampling import check_sampling_args, device_and_dtype, global_step_of, run_geneval, student_parser

NOISE_TYPES = ("fresh", "fixed", "ddim")


def parse_args(argv=None):
    parser = student_parser(__doc__)
    parser.set_defaults(guidance_scale=None)
    g = parser.add_argument_group("generator (default: the settings saved with the export)")
    g.add_argument("--train_generator_steps", type=positive_int, default=None,
                   help="K the generator was trained with (default: from the export, else the step count)")
    g.add_argument("--init_time", type=positive_float, default=None, help="t_init (default: from the export, or 1)")
    g.add_argument("--generator_time_shift", type=str2bool, nargs="?", const=True, default=None,
                   help="FLUX's resolution shift of the step times (default: from the export, or off)")
    g.add_argument("--noise_type", choices=NOISE_TYPES, default=None, help="default: from the export, or fresh")
    g.add_argument("--time_input_scale", type=nonnegative_float, default=None,
                   help="1000 (FLUX's own time input) or 1 (rescaled); default: from the export, or the model's")
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = check_sampling_args(parse_args(argv))
    from model.loading import load_transformer
    from model.pipeline import FluxSiDPipeline
    from training.checkpoint import read_export_metadata

    meta = read_export_metadata(args.resume_path)
    if meta and meta.get("method") != "sid":
        raise UsageError(f"--resume_path {args.resume_path} is a {meta.get('method')} export; sample it with "
                         f"test_{meta.get('method')}.py")
    settings = {
        "train_steps": args.train_generator_steps or meta.get("train_steps"),
        "init_time": args.init_time or meta.get("init_time", 1.0),
        "time_shift": args.generator_time_shift if args.generator_time_shift is not None else
        meta.get("time_shift", False),
        "noise_type": args.noise_type or meta.get("noise_type", "fresh"),
    }
    if args.guidance_scale is None:
        args.guidance_scale = meta.get("guidance_scale", 3.5)
    scale = args.time_input_scale if args.time_input_scale is not None else meta.get("time_input_scale")
    device, dtype = device_and_dtype(args.mixed_precision)
    hub = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    transformer = load_transformer(args.pretrained_model_name_or_path, weights_path=args.resume_path,
                                   time_input_scale=scale, dtype=dtype, **hub)
    pipeline = FluxSiDPipeline.from_pretrained(args.pretrained_model_name_or_path, transformer=transformer, dtype=dtype,
                                               **hub).to(device)
    pipeline.configure_generator(settings["noise_type"], settings["init_time"], settings["time_shift"],
                                 settings["train_steps"])
    step = args.global_step if args.global_step is not None else global_step_of(args.resume_path)
    config = {"resume_path": str(args.resume_path), **settings,
              "time_input_scale": transformer.config.time_input_scale}
    return [run_geneval(args, pipeline, step, config, n) for n in args.num_inference_steps]


if __name__ == "__main__":
    run(main)
