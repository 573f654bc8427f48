#!/usr/bin/env bash
# Shared by train_sCM.sh and train_meanflow.sh (source it): launch_distill SCRIPT RUN_DIR LR RES BATCH RESCALED MAX_STEPS [method flags...]
# runs SCRIPT under torchrun on this node (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several nodes)
# with the flags every distillation run shares; relaunching resumes from the latest checkpoint in RUN_DIR.
launch_distill() {
  local script=$1 run_dir=$2 lr=$3 resolution=$4 batch_size=$5 rescaled=$6 max_steps=$7
  shift 7
  local nproc=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
  torchrun --nproc_per_node="$nproc" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --rdzv-conf=timeout=36000 \
    "$script" \
    --pretrained_model_name_or_path "${MODEL_NAME:-Freepik/flux.1-lite-8B}" \
    --rescaled_checkpoint_path "$rescaled" \
    --dataset_name "${DATASET:-brivangl/midjourney-v6-llava}" \
    --data_files data/train_000.parquet data/train_001.parquet data/train_002.parquet \
    --resolution "$resolution" --dataloader_num_workers 4 \
    --output_dir "$run_dir" \
    --train_batch_size "$batch_size" --gradient_accumulation_steps 1 \
    --ds_file "parallel_config/deepspeed_bf16_batch${batch_size}.json" \
    --max_train_steps "$max_steps" --max_grad_norm 0.1 \
    --gradient_checkpointing \
    --learning_rate "$lr" \
    --checkpointing_steps 1000 --checkpoints_total_limit 5 --resume_from_checkpoint latest \
    --validation_prompt "a photo of a cat sitting on a red bench" --validation_steps 500 \
    --allow_tf32 \
    --report_to tensorboard \
    "$@"
}
