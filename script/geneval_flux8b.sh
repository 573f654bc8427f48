#!/usr/bin/env bash
# Sample the 553 GenEval prompts (4 images each) with the FLUX teacher on every GPU of this node.
#   bash script/geneval_flux8b.sh [OUT_DIR] [NFE] [CFG] [RES]
# Images land in OUT_DIR/GenEval_RESOLUTION{RES}_NFE{NFE}_cfg{CFG}/images/global_steps0/; rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-outputs/flux8b}
NFE=${2:-28}
CFG=${3:-3.5}
RES=${4:-512}
MODEL=${MODEL:-Freepik/flux.1-lite-8B}
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
torchrun --nproc_per_node "$NPROC" test_flux8b.py \
    --pretrained_model_name_or_path "$MODEL" \
    --resolution "$RES" \
    --num_inference_steps "$NFE" \
    --guidance_scale "$CFG" \
    --seed 42 \
    --max_sequence_length 256 \
    --batch_size 4 \
    --output_dir "$OUT_DIR"
# SCORE=1: score the folder with GenEval's rules right away (script/geneval_score.sh)
if [ "${SCORE:-0}" = 1 ]; then
  bash script/geneval_score.sh "$OUT_DIR/GenEval_RESOLUTION${RES}_NFE${NFE}_cfg$(python -c "print(float('$CFG'))")/images/global_steps0"
fi
