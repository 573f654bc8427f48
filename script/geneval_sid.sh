#!/usr/bin/env bash
# GenEval sampling of a SiD generator:  bash script/geneval_sid.sh CKPT_PATH CKPT_ITER [NFE...] (default 1 2 4)
# The generator's schedule (K, t_init, noise type) is read from the export. Environment: MODEL_NAME, RESOLUTION
# (512), CFG (the generator's guidance embedding, 3.5 by default in training), NPROC.
exec bash "$(dirname "$0")/geneval_student.sh" test_sid.py "$@"
