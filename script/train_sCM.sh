#!/usr/bin/env bash
# sCM distillation of FLUX.1-lite-8B on a GPU cluster (the reference's positional arguments).
#   bash script/train_sCM.sh LR RES BATCH OUT_DIR RESCALED_PATH
#   e.g. bash script/train_sCM.sh 1e-6 512 8 /data/runs/scm /data/rescaled/flux_lite_x1.pt
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (torch's meanings; the reference used
# WORLD_SIZE/RANK for nodes, which clashes with torchrun's own variables). Relaunching resumes from the
# latest checkpoint in OUT_DIR/resolution{RES}_bs{BATCH}_lr{LR}.
set -euo pipefail
cd "$(dirname "$0")/.."
LR=${1:-1e-6}
RESOLUTION=${2:-512}
BATCH_SIZE=${3:-8}
OUT_DIR=${4:?OUT_DIR required}
RESCALED_PATH=${5:?RESCALED_PATH required (make it with train_rescale.py)}
MODEL_NAME=${MODEL_NAME:-Freepik/flux.1-lite-8B}
DATASET=${DATASET:-brivangl/midjourney-v6-llava}
MAX_STEPS=${MAX_STEPS:-3000}   # the paper saw no gain after 3k iterations at global batch 128
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
RUN_DIR="$OUT_DIR/resolution${RESOLUTION}_bs${BATCH_SIZE}_lr${LR}"

torchrun --nproc_per_node="$NPROC" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --rdzv-conf=timeout=36000 \
  train_sCM.py \
  --pretrained_model_name_or_path "$MODEL_NAME" \
  --rescaled_checkpoint_path "$RESCALED_PATH" \
  --dataset_name "$DATASET" --data_files data/train_000.parquet data/train_001.parquet data/train_002.parquet \
  --resolution "$RESOLUTION" --dataloader_num_workers 4 \
  --output_dir "$RUN_DIR" \
  --train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps 1 \
  --ds_file "parallel_config/deepspeed_bf16_batch${BATCH_SIZE}.json" \
  --max_train_steps "$MAX_STEPS" --max_grad_norm 0.1 \
  --gradient_checkpointing \
  --learning_rate "$LR" \
  --checkpointing_steps 1000 --checkpoints_total_limit 5 --resume_from_checkpoint latest \
  --validation_prompt "a photo of a cat sitting on a red bench" --validation_steps 500 \
  --allow_tf32 \
  --report_to tensorboard \
  --logit_mean 0.2 --logit_std 1.6
