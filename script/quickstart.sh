#!/usr/bin/env bash
# Set up (.venv) and run the embedded default job on a CPU with no download: build a tiny random FLUX
# offline and sample a few GenEval prompts with the teacher into the GenEval layout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash script/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
OUT=${OUT:-outputs/quickstart}
python script/make_tiny_flux.py --output_dir "$OUT/tiny-flux"
python test_flux8b.py --pretrained_model_name_or_path "$OUT/tiny-flux" --resolution 64 --limit 3 \
    --output_dir "$OUT/teacher"
echo "GenEval-layout images: $(ls -d "$OUT"/teacher/GenEval_*/images/global_steps0)"
