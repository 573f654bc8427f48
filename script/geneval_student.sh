#!/usr/bin/env bash
# Sample the GenEval prompts with a distilled student on every GPU of this node (used by geneval_sCM.sh,
# geneval_meanflow.sh and geneval_sid.sh).
#   bash script/geneval_student.sh SCRIPT CKPT_PATH CKPT_ITER [NFE...]      (default NFE: 1 2 4)
# reads CKPT_PATH/ckpts/transformer_{CKPT_ITER}.pt, writes CKPT_PATH/GenEval/GenEval_RESOLUTION{R}_NFE{n}_cfg{g}/.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=${1:?SCRIPT required (test_sCM.py, test_meanflow.py or test_sid.py)}
CKPT_PATH=${2:?CKPT_PATH required}
CKPT_ITER=${3:?CKPT_ITER required}
shift 3
NFE=${*:-1 2 4}
MODEL_NAME=${MODEL_NAME:-Freepik/flux.1-lite-8B}
RESOLUTION=${RESOLUTION:-512}
CFG=${CFG:-3.5}
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
# shellcheck disable=SC2086
torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29331}" "$SCRIPT" \
  --pretrained_model_name_or_path "$MODEL_NAME" \
  --max_sequence_length 256 --seed 42 \
  --resolution "$RESOLUTION" --num_inference_steps $NFE --guidance_scale "$CFG" \
  --output_dir "$CKPT_PATH/GenEval" \
  --resume_path "$CKPT_PATH/ckpts/transformer_${CKPT_ITER}.pt"
# SCORE=1: score each folder with GenEval's rules right away (script/geneval_score.sh)
if [ "${SCORE:-0}" = 1 ]; then
  G=$(python -c "print(float('$CFG'))")
  for n in $NFE; do
    bash script/geneval_score.sh "$CKPT_PATH/GenEval/GenEval_RESOLUTION${RESOLUTION}_NFE${n}_cfg${G}/images/global_steps${CKPT_ITER}"
  done
fi
