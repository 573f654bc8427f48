"""Sample GenEval prompts with a MeanFlow student in 1, 2 or 4 steps into the GenEval layout.

    python test_meanflow.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --resume_path out/meanflow/ckpts/transformer_25000.pt --num_inference_steps 1 2 4 --output_dir outputs/mf

--resume_path takes our exports (diffusers folder or ckpts/transformer_<k>.pt) and the reference's released
students as they are. Batched, sharded under torchrun, resumable and seeded per image like test_flux8b.py.
Sampling: z_r = z_t - (t - r) u(z_t, t, t - r) on FLUX's resolution-shifted schedule (METHODS 5.2).
"""

from evaluation.sampling import add_student_args, device_and_dtype, run_student_geneval, sampling_parser
from model.loading import load_transformer
from model.pipeline import FluxMeanFlowPipeline


def main(argv=None) -> None:
    parser = sampling_parser(__doc__.splitlines()[0], default_steps=[4])
    add_student_args(parser)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.mixed_precision)
    hub = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    transformer = load_transformer(args.pretrained_model_name_or_path, weights_path=args.resume_path,
                                   time_input_scale=1.0, dual_timestep=True, dtype=dtype, **hub)
    pipeline = FluxMeanFlowPipeline.from_pretrained(
        args.pretrained_model_name_or_path, transformer=transformer, dtype=dtype, **hub
    ).to(device)
    run_student_geneval(args, pipeline)


if __name__ == "__main__":
    main()
