#!/usr/bin/env bash
# SiD few-step distillation of FLUX.1-lite-8B on a GPU cluster (data-free; the reference's positional style).
#   bash script/train_sid.sh LR RES BATCH STRATEGY OUT_DIR [RESCALED_PATH]
#   e.g. bash script/train_sid.sh 1e-6 512 8 lsg /data/runs/sid            (STRATEGY: lsg | zero_cfg | anti_cfg)
# The prompts are the dataset's captions (no image is decoded) or PROMPTS_FILE; without RESCALED_PATH the teacher
# is the original x1000 FLUX (SiD needs no JVP). Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
# Relaunching resumes from the latest checkpoint. Environment: MODEL_NAME, DATASET, PROMPTS_FILE, NPROC,
# MAX_STEPS (10000), K (generator steps, 4), FAKE_LR (default LR), GAN=1 (Diffusion-GAN with the dataset's images).
set -euo pipefail
cd "$(dirname "$0")/.."
. script/_launch_distill.sh
LR=${1:-1e-6}
RESOLUTION=${2:-512}
BATCH_SIZE=${3:-8}
STRATEGY=${4:-lsg}
OUT_DIR=${5:?OUT_DIR required}
RESCALED_PATH=${6:-}
MAX_STEPS=${MAX_STEPS:-10000}
EXTRA=(--guidance_strategy "$STRATEGY" --num_generator_steps "${K:-4}" --fake_learning_rate "${FAKE_LR:-$LR}")
[ -n "${PROMPTS_FILE:-}" ] && EXTRA+=(--prompts_file "$PROMPTS_FILE")
[ "${GAN:-0}" = 1 ] && EXTRA+=(--gan)

launch_distill train_sid.py "$OUT_DIR/resolution${RESOLUTION}_bs${BATCH_SIZE}_lr${LR}_${STRATEGY}" "$LR" \
  "$RESOLUTION" "$BATCH_SIZE" "$RESCALED_PATH" "$MAX_STEPS" "${EXTRA[@]}"
