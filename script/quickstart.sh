#!/usr/bin/env bash
# From a fresh clone: set up .venv and run the quick toy-world benchmark on a CPU with no download
# (distil the shipped toy teacher, toyworld/toy_teacher, with sCM, MeanFlow and SiD, sample held-out
# GenEval-style prompts with every model and score them with GenEval's rules).
# It ends with the results table and the path of the image grids. Full mode: MODE=full.
set -euo pipefail
cd "$(dirname "$0")/.."
bash script/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python script/toy_benchmark.py --mode "${MODE:-quick}" "$@"
