#!/usr/bin/env bash
# Every GPU check of the project in one command, on a machine with a CUDA device and torch, lightning, triton,
# pytest, hypothesis, scikit-learn and psutil installed:
#
#     bash benchmarks/gpu.sh [results folder]         (no install needed: it puts the checkout on PYTHONPATH)
#
# An offline GPU machine without scikit-learn or psutil: on a machine with a package registry, fetch the wheels
#     pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#         --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps \
#         psutil scikit-learn scipy joblib threadpoolctl pytest-timeout -d .gpu-wheels
# carry .gpu-wheels over, and there: pip install --no-index --no-deps .gpu-wheels/*.whl
#
# Writes into the folder (default benchmarks/results/gpu), each file as soon as its stage is done, so a run cut
# short keeps what it finished, most wanted first: device.txt, overhead.md (one GPU worker against plain
# training, ~4 min), tests.txt (the CUDA tests, ~3 min; skipped, with the reason, when their packages are
# missing), kernel.md (fused kernels against a device copy, ~1 min). Each stage has a time limit of its own
# (STAGE_SECONDS, default 300); the exit status is 0 only if every stage ran and passed.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-$root/benchmarks/results/gpu}")"
limit="${STAGE_SECONDS:-300}"
failed=0
mkdir -p "$out"
cd "$root"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts' own subprocesses import the package too
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, triton, lightning; print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__)"
    nproc
} > "$out/device.txt" 2>&1
timeout -k 10 "$limit" python benchmarks/gpu_overhead.py > "$out/overhead.md" 2> "$out/overhead.log" || failed=1
if python -c "import psutil, sklearn, hypothesis, pytest, pytest_timeout" 2> /dev/null; then
    timeout -k 10 "$limit" python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py \
        -k "cuda or gpu" --durations=10 > "$out/tests.txt" 2>&1 || failed=1
else
    echo "not run: the tests need psutil, scikit-learn, hypothesis, pytest and pytest-timeout (see $0)" \
        | tee "$out/tests.txt"
    failed=1
fi
timeout -k 10 "$limit" python benchmarks/kernel.py > "$out/kernel.md" 2> "$out/kernel.log" || failed=1
exit "$failed"
