#!/usr/bin/env bash
# Score GenEval-layout folders with GenEval's rules on every GPU of this node (Mask2Former + CLIP on transformers).
#   bash script/geneval_score.sh RUN_DIR [RUN_DIR ...]
# Each RUN_DIR holds <NNNNN>/metadata.jsonl + samples/*.png (e.g. .../GenEval_RESOLUTION512_NFE4_cfg3.5/images/
# global_steps0); results.jsonl and results_summary.json land in it. Environment: NPROC, DETECTOR (mask2former|toy),
# DETECTOR_MODEL, CLIP_MODEL, BATCH (8).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash script/geneval_score.sh RUN_DIR [RUN_DIR ...]" >&2; exit 2; }
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
for RUN_DIR in "$@"; do
  torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29341}" evaluate_geneval.py "$RUN_DIR" \
    --detector "${DETECTOR:-mask2former}" \
    --detector_model "${DETECTOR_MODEL:-facebook/mask2former-swin-small-coco-instance}" \
    --clip_model "${CLIP_MODEL:-openai/clip-vit-large-patch14}" \
    --batch_size "${BATCH:-8}"
done
