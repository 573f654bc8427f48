#!/usr/bin/env bash
# Make the rescaled (x1) FLUX.1-lite-8B teacher on a GPU cluster; its output is the RESCALED_PATH that
# script/train_sCM.sh and script/train_meanflow.sh take.
#   bash script/rescale_teacher.sh OUT_DIR [LR] [RES] [BATCH] [STEPS]
# Writes OUT_DIR/rescaled.pt ({"module": state_dict}), OUT_DIR/transformer/ and OUT_DIR/rescale_eval.json.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT. Relaunching resumes from the latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?OUT_DIR required}
LR=${2:-1e-5}
RESOLUTION=${3:-1024}   # the paper rescaled at 1024^2 (batch 128, 120k iterations)
BATCH_SIZE=${4:-4}
MAX_STEPS=${5:-4000}
MODEL_NAME=${MODEL_NAME:-Freepik/flux.1-lite-8B}
DATASET=${DATASET:-brivangl/midjourney-v6-llava}
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}

torchrun --nproc_per_node="$NPROC" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --rdzv-conf=timeout=36000 \
  train_rescale.py \
  --pretrained_model_name_or_path "$MODEL_NAME" \
  --dataset_name "$DATASET" --data_files data/train_000.parquet data/train_001.parquet data/train_002.parquet \
  --resolution "$RESOLUTION" --dataloader_num_workers 4 \
  --output_dir "$OUT_DIR" \
  --train_batch_size "$BATCH_SIZE" \
  --ds_file "parallel_config/deepspeed_bf16_batch${BATCH_SIZE}.json" \
  --max_train_steps "$MAX_STEPS" --max_grad_norm 1.0 \
  --gradient_checkpointing \
  --learning_rate "$LR" --lr_scheduler constant --lr_warmup_steps 200 \
  --checkpointing_steps 500 --checkpoints_total_limit 3 --resume_from_checkpoint latest \
  --init remap --rescale_loss smooth_l1 --guidance_min 1 --guidance_max 6 \
  --allow_tf32 --report_to tensorboard
