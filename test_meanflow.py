"""Sample GenEval prompts with a MeanFlow student in 1, 2 or 4 steps into the GenEval layout.

    python test_meanflow.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --resume_path out/meanflow/ckpts/transformer_25000.pt --num_inference_steps 1 2 4 --output_dir outputs/mf

--resume_path takes our exports (diffusers folder or ckpts/transformer_<k>.pt) and the reference's released
students as they are. Batched, sharded under torchrun, resumable and seeded per image like test_flux8b.py.
Sampling: z_r = z_t - (t - r) u(z_t, t, t - r) on FLUX's resolution-shifted schedule (METHODS 5.2).
"""

from common.cli import run
from evaluation.sampling import student_main


def main(argv=None):
    return student_main(__doc__, "FluxMeanFlowPipeline", argv, dual_timestep=True)


if __name__ == "__main__":
    run(main)
