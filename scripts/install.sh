#!/usr/bin/env bash
# Install rayweights and its dependencies into the current Python environment.
# Order matters: torch first (from the local wheel cache where there is one), then DeepSpeed
# without build isolation (it compiles against the installed torch), then the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python}
$PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
$PY -m pip install -q setuptools wheel
$PY -m pip install -q --no-build-isolation "deepspeed>=0.15,<1"
$PY -m pip install -q -e ".[dev]"
echo "rayweights installed: $($PY -c 'import rayweights, torch, ray, deepspeed; print("torch", torch.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__)')"
