#!/usr/bin/env bash
# Create .venv (if absent) and install the project's requirements into it. Idempotent.
#   bash script/setup.sh            # CPU or GPU machine; set TORCH_SPEC to choose another torch build
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned, so the requirements' range (torch>=2.5) installs nothing more
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet -r requirements.txt
python -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
