#!/usr/bin/env bash
# sCM distillation of FLUX.1-lite-8B on a GPU cluster (the reference's positional arguments).
#   bash script/train_sCM.sh LR RES BATCH OUT_DIR RESCALED_PATH
#   e.g. bash script/train_sCM.sh 1e-6 512 8 /data/runs/scm /data/rescaled/rescaled.pt
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (torch's meanings; the reference used
# WORLD_SIZE/RANK for nodes, which clashes with torchrun's own variables). Relaunching resumes from the
# latest checkpoint in OUT_DIR/resolution{RES}_bs{BATCH}_lr{LR}. Environment: MODEL_NAME, DATASET, NPROC, MAX_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
. script/_launch_distill.sh
LR=${1:-1e-6}
RESOLUTION=${2:-512}
BATCH_SIZE=${3:-8}
OUT_DIR=${4:?OUT_DIR required}
RESCALED_PATH=${5:?RESCALED_PATH required (make it with train_rescale.py)}
MAX_STEPS=${MAX_STEPS:-3000}   # the paper saw no gain after 3k iterations at global batch 128

launch_distill train_sCM.py "$OUT_DIR/resolution${RESOLUTION}_bs${BATCH_SIZE}_lr${LR}" "$LR" "$RESOLUTION" \
  "$BATCH_SIZE" "$RESCALED_PATH" "$MAX_STEPS" \
  --logit_mean 0.2 --logit_std 1.6
