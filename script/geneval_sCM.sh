#!/usr/bin/env bash
# GenEval sampling of an sCM student:  bash script/geneval_sCM.sh CKPT_PATH CKPT_ITER [NFE...] (default 1 2 4)
# Environment: MODEL_NAME, RESOLUTION (512), CFG (3.5; the reference's README suggests 4.5 at 1-2 steps), NPROC,
# SCORE=1 (score with GenEval's rules afterwards).
exec bash "$(dirname "$0")/geneval_student.sh" test_sCM.py "$@"
