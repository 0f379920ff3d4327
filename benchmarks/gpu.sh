#!/usr/bin/env bash
# For a machine with an NVIDIA GPU (never required): the tests that touch CUDA, then the CUDA
# checks and a short speed table (python -m benchmarks.gpu), in under 8 minutes.
#   bash benchmarks/gpu.sh           on the GPU machine: .venv with torch's CUDA build, tests, table
#   bash benchmarks/gpu.sh --smoke   anywhere: the same steps on the CPU, small (checks this script)
# Set PYTHON=/path/to/python to use an interpreter that already has a CUDA torch (no install);
# TORCH_INDEX to install torch from another index than PyPI's, whose Linux wheels are CUDA builds.
# The GPU's results go to runs/bench/gpu.json as well (the smoke run's nowhere).
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=${1:-}
BUDGET=470                  # seconds for all of it; each step gets what is left (timeout)
TORCH_VERSION=2.13.0        # pyproject.toml pins the same: one torch, CPU or CUDA build
left() { echo $((BUDGET - SECONDS)); }
leaving() { local t=$(($(left) - $1)); echo $((t > 30 ? t : 30)); }  # the time left less $1 s for later steps

if [ "$SMOKE" = "--smoke" ]; then
    DEVICE=cpu
else
    DEVICE=cuda
    if ! command -v nvidia-smi >/dev/null; then
        echo "gpu.sh: no nvidia-smi here, so no NVIDIA GPU; nothing to do (bash benchmarks/gpu.sh --smoke checks the script)"
        exit 0
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
else
    # .venv as run.sh makes it (torch pinned first, then .[dev]); --help runs nothing else.
    timeout "$(leaving 200)" bash run.sh --help >/dev/null
    PY=.venv/bin/python
    if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        # A CPU build (2.13.0+cpu) is in the venv: replace it by the CUDA build of the same version.
        # `===` matches the version string exactly, so a local 2.13.0+cpu wheel cannot satisfy
        # it; pip removes the CPU build only once the CUDA one is downloaded.
        echo "gpu.sh: installing torch $TORCH_VERSION's CUDA build (a few GB)"
        timeout "$(leaving 200)" "$PY" -m pip install -q --index-url "${TORCH_INDEX:-https://pypi.org/simple}" \
            "torch===$TORCH_VERSION"
    fi
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    "$PY" -c "import torch; print(f'gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU')" >&2
    exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The tests that mention CUDA (they skip what needs a GPU they do not have), default tier.
mapfile -t CUDA_TESTS < <(grep -l -i cuda tests/test_*.py || true)
if [ ${#CUDA_TESTS[@]} -gt 0 ]; then  # none named: pytest would run the whole suite
    echo "gpu.sh: ${CUDA_TESTS[*]}"
    timeout "$(leaving 180)" "$PY" -m pytest -q -p no:cacheprovider "${CUDA_TESTS[@]}"
fi

if [ "$DEVICE" = cuda ]; then
    timeout "$(left)" "$PY" -m benchmarks.gpu --out runs/bench/gpu.json
else
    timeout "$(left)" "$PY" -m benchmarks.gpu --device cpu --smoke
fi
echo "gpu.sh: done in ${SECONDS}s"
