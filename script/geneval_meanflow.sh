#!/usr/bin/env bash
# GenEval sampling of a MeanFlow student:  bash script/geneval_meanflow.sh CKPT_PATH CKPT_ITER [NFE...] (default 1 2 4)
# Environment: MODEL_NAME, RESOLUTION (512), CFG (3.5), NPROC.
exec bash "$(dirname "$0")/geneval_student.sh" test_meanflow.py "$@"
