"""Sample GenEval prompts with an sCM student in 1, 2 or 4 steps into the GenEval layout.

    python test_sCM.py --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --resume_path out/scm/ckpts/transformer_3000.pt --num_inference_steps 1 2 4 --output_dir outputs/scm

--resume_path takes our exports (diffusers folder or ckpts/transformer_<k>.pt) and the reference's released
students as they are. Batched, sharded under torchrun, resumable and seeded per image like test_flux8b.py.
Two steps use the intermediate angle 1.3 (METHODS 5.1).
"""

from common.cli import run
from evaluation.sampling import student_main


def main(argv=None):
    # the reference's sCM checkpoints also hold the training-only log-variance head
    return student_main(__doc__, "FluxSCMPipeline", argv, drop_keys=("logvar_linear.",))


if __name__ == "__main__":
    run(main)
