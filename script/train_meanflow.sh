#!/usr/bin/env bash
# MeanFlow distillation of FLUX.1-lite-8B on a GPU cluster (the reference's 10 positional arguments).
#   bash script/train_meanflow.sh LR RES BATCH CFG_MEANFLOW OMEGA KAPPA T_MIN T_MAX OUT_DIR RESCALED_PATH
#   e.g. bash script/train_meanflow.sh 1e-6 512 8 True 1.0 0.5 0.0 1.0 /data/runs/mf /data/rescaled/rescaled.pt
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT. Relaunching resumes from the latest checkpoint.
# Environment: MODEL_NAME, DATASET, NPROC, MAX_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
. script/_launch_distill.sh
LR=${1:-1e-6}
RESOLUTION=${2:-512}
BATCH_SIZE=${3:-8}
CFG_MEANFLOW=${4:-True}
CFG_OMEGA=${5:-1.0}
CFG_KAPPA=${6:-0.5}
CFG_MIN_T=${7:-0.0}
CFG_MAX_T=${8:-1.0}
OUT_DIR=${9:?OUT_DIR required}
RESCALED_PATH=${10:?RESCALED_PATH required (make it with train_rescale.py)}
MAX_STEPS=${MAX_STEPS:-25000}   # the paper's MeanFlow runs: 25k iterations at global batch 128
RUN_DIR="$OUT_DIR/resolution${RESOLUTION}_bs${BATCH_SIZE}_lr${LR}_cfg${CFG_MEANFLOW}_omg${CFG_OMEGA}_kpa${CFG_KAPPA}_t${CFG_MIN_T}-${CFG_MAX_T}"

launch_distill train_meanflow.py "$RUN_DIR" "$LR" "$RESOLUTION" "$BATCH_SIZE" "$RESCALED_PATH" "$MAX_STEPS" \
  --use_cfg_meanflow "$CFG_MEANFLOW" \
  --cfg_omega "$CFG_OMEGA" \
  --cfg_kappa "$CFG_KAPPA" \
  --cfg_min_t "$CFG_MIN_T" \
  --cfg_max_t "$CFG_MAX_T"
