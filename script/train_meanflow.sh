#!/usr/bin/env bash
# MeanFlow distillation of FLUX.1-lite-8B on a GPU cluster (the reference's 10 positional arguments).
#   bash script/train_meanflow.sh LR RES BATCH CFG_MEANFLOW OMEGA KAPPA T_MIN T_MAX OUT_DIR RESCALED_PATH
#   e.g. bash script/train_meanflow.sh 1e-6 512 8 True 1.0 0.5 0.0 1.0 /data/runs/mf /data/rescaled/x1.pt
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT. Relaunching resumes from the latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
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
MODEL_NAME=${MODEL_NAME:-Freepik/flux.1-lite-8B}
DATASET=${DATASET:-brivangl/midjourney-v6-llava}
MAX_STEPS=${MAX_STEPS:-25000}   # the paper's MeanFlow runs: 25k iterations at global batch 128
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
RUN_DIR="$OUT_DIR/resolution${RESOLUTION}_bs${BATCH_SIZE}_lr${LR}_cfg${CFG_MEANFLOW}_omg${CFG_OMEGA}_kpa${CFG_KAPPA}_t${CFG_MIN_T}-${CFG_MAX_T}"

torchrun --nproc_per_node="$NPROC" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --rdzv-conf=timeout=36000 \
  train_meanflow.py \
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
  --validation_prompt "a photo of a cat sitting on a red bench" --validation_steps 1000 \
  --allow_tf32 \
  --report_to tensorboard \
  --use_cfg_meanflow "$CFG_MEANFLOW" \
  --cfg_omega "$CFG_OMEGA" \
  --cfg_kappa "$CFG_KAPPA" \
  --cfg_min_t "$CFG_MIN_T" \
  --cfg_max_t "$CFG_MAX_T"
