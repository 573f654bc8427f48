"""Sample GenEval prompts with the FLUX teacher (flow-match Euler, 28 steps, guidance 3.5) into the GenEval layout.

    python test_flux8b.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B --output_dir outputs
    torchrun --nproc_per_node 8 test_flux8b.py ...   # prompts are sharded across processes

Batched (--batch_size), resumable (finished prompt folders are skipped) and seeded per image, so the images
do not depend on the batch size or on the number of processes. With --rescaled_checkpoint_path it samples
the rescaled (x1 time input) teacher instead of the original.
"""

from common.cli import run
from evaluation.sampling import check_sampling_args, device_and_dtype, run_geneval, sampling_parser


def parse_args(argv=None):
    parser = sampling_parser(__doc__.splitlines()[0], default_steps=28)
    parser.add_argument("--rescaled_checkpoint_path", default=None,
                        help="weights of the rescaled (x1) teacher: .pt {'module': state_dict}, .safetensors or folder")
    return check_sampling_args(parser.parse_args(argv))


def main(argv=None) -> None:
    args = parse_args(argv)  # before the model stack is imported, so that a mistake is reported at once
    from model.loading import load_transformer
    from model.pipeline import FluxEulerPipeline

    device, dtype = device_and_dtype(args.mixed_precision)
    hub = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    transformer = load_transformer(
        args.pretrained_model_name_or_path,
        weights_path=args.rescaled_checkpoint_path,
        time_input_scale=1.0 if args.rescaled_checkpoint_path else None,
        dtype=dtype,
        **hub,
    )
    pipeline = FluxEulerPipeline.from_pretrained(
        args.pretrained_model_name_or_path, transformer=transformer, dtype=dtype, **hub
    ).to(device)
    run_geneval(args, pipeline, extra_config={"rescaled_checkpoint_path": args.rescaled_checkpoint_path})


if __name__ == "__main__":
    run(main)
