"""Sample GenEval prompts with an sCM student in 1, 2 or 4 steps into the GenEval layout.

    python test_sCM.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --resume_path out/scm/ckpts/transformer_3000.pt --num_inference_steps 1 2 4 --output_dir outputs/scm

--resume_path takes our exports (diffusers folder or ckpts/transformer_<k>.pt) and the reference's released
students as they are. Batched, sharded under torchrun, resumable and seeded per image like test_flux8b.py.
Two steps use the intermediate angle 1.3 (METHODS 5.1).
"""

from evaluation.sampling import add_student_args, device_and_dtype, run_student_geneval, sampling_parser
from model.loading import load_transformer
from model.pipeline import FluxSCMPipeline


def main(argv=None) -> None:
    parser = sampling_parser(__doc__.splitlines()[0], default_steps=[4])
    add_student_args(parser)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.mixed_precision)
    hub = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    # the reference's sCM checkpoints also hold the training-only log-variance head
    transformer = load_transformer(args.pretrained_model_name_or_path, weights_path=args.resume_path,
                                   time_input_scale=1.0, dtype=dtype, drop_keys=("logvar_linear.",), **hub)
    pipeline = FluxSCMPipeline.from_pretrained(
        args.pretrained_model_name_or_path, transformer=transformer, dtype=dtype, **hub
    ).to(device)
    run_student_geneval(args, pipeline)


if __name__ == "__main__":
    main()
