#!/usr/bin/env bash
# Every GPU check of the project in one command, on a machine with a CUDA device and torch, lightning, triton,
# pytest and hypothesis installed (the Trainer tests also need scikit-learn and psutil):
#
#     bash benchmarks/gpu.sh [results folder]         (no install needed: it puts the checkout on PYTHONPATH)
#
# Writes device.txt, tests.txt (the CUDA tests), kernel.md (fused kernels against a device copy) and overhead.md
# (one GPU worker against plain training) into the folder (default benchmarks/results/gpu), each as soon as it is
# done, so a run cut short keeps what it finished.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-$root/benchmarks/results/gpu}")"
mkdir -p "$out"
cd "$root"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts' own subprocesses import the package too
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__)"
    nproc
} > "$out/device.txt" 2>&1
python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py -k "cuda or gpu" --durations=10 \
    > "$out/tests.txt" 2>&1
python benchmarks/kernel.py > "$out/kernel.md" 2> "$out/kernel.log"
python benchmarks/gpu_overhead.py > "$out/overhead.md" 2> "$out/overhead.log"
