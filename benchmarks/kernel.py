"""Bandwidth of the fused kernels in ``lightning_adag.kernels`` against the unfused torch path and a device copy.

On a GPU machine with torch, lightning and triton installed::

    pip install --no-deps -e . && python benchmarks/kernel.py            # 1M, 10M, 100M elements
    python benchmarks/kernel.py --sizes 1e6 3e7 --repeats 21

Each operation's bandwidth counts the bytes it must move at least: every input read once, every output written once
(``window_delta`` reads θ and θ⁰ and writes the delta, plus reading and writing the residual with error feedback;
``elastic_exchange`` reads θ and the center and writes θ and E; ``install_center`` reads the center and writes θ and
θ⁰; ``fold_center``, for overlapped exchanges, reads the center, θ and θ⁰ and writes θ and θ⁰).
The unfused column runs the same call down the torch path (what a CPU tensor, or a machine without triton, gets):
several kernels, each a full pass. The copy column is ``dst.copy_(src)`` moving the same number of bytes (half
read, half written): the card's practical ceiling. Times are CUDA-event medians over ``--repeats`` samples, each
sample enough calls to move about ``SAMPLE_BYTES``. Vectors that fit in L2 (1M float32 elements, times three) run
from cache in every column alike, so the ratios stay fair there but the GB/s are not DRAM figures. The issue's
target: fused at least 85% of copy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from unittest import mock

import torch
from throughput import table

from lightning_adag import kernels

F32, BF16 = torch.float32, torch.bfloat16
SAMPLE_BYTES = 2e9  # moved per timing sample: long enough for CUDA events to resolve, short enough to repeat


def cases(numel: int) -> dict[str, tuple[int, Callable[[], object]]]:
    """Name -> (bytes moved, call), on fresh CUDA vectors of ``numel`` elements."""

    def vector(dtype=F32):
        return torch.randn(numel, device="cuda").to(dtype)

    theta, theta0, center, residual = vector(), vector(), vector(), vector() * 1e-3
    out32, out16, params16, params16_0 = vector(), vector(BF16), vector(BF16), vector(BF16)
    n4, n2 = 4 * numel, 2 * numel
    return {
        "window_delta f32 → f32": (3 * n4, lambda: kernels.window_delta(theta, theta0, 1 / 8, out32)),
        "window_delta f32 → bf16 + residual": (
            4 * n4 + n2, lambda: kernels.window_delta(theta, theta0, 1 / 8, out16, residual)
        ),
        "elastic_exchange f32 → f32": (4 * n4, lambda: kernels.elastic_exchange(theta, center, 0.1, out32)),
        "elastic_exchange f32 → bf16": (3 * n4 + n2, lambda: kernels.elastic_exchange(theta, center, 0.1, out16)),
        "install_center f32 → f32": (3 * n4, lambda: kernels.install_center(center, theta, theta0)),
        "install_center f32 → bf16": (n4 + 2 * n2, lambda: kernels.install_center(center, params16, params16_0)),
        "fold_center f32 → f32": (5 * n4, lambda: kernels.fold_center(center, theta, theta0)),
    }  # fmt: skip


def seconds_per_call(call, nbytes: int, repeats: int) -> float:
    """Median over ``repeats`` samples of the CUDA-event time per call."""
    calls = max(1, round(SAMPLE_BYTES / nbytes))
    for _ in range(3):  # compile and warm up
        call()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def copy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return seconds_per_call(lambda: dst.copy_(src), nbytes, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="elements per vector")
    parser.add_argument("--repeats", type=int, default=11, help="samples per median")
    args = parser.parse_args()
    if not torch.cuda.is_available() or kernels.triton is None:
        print("benchmarks/kernel.py measures CUDA kernels: it needs a CUDA device and triton; nothing to do here.")
        return
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {kernels.triton.__version__}")
    print(f"command: python benchmarks/kernel.py {' '.join(sys.argv[1:])}")
    rows = []
    for numel in map(int, args.sizes):
        for name, (nbytes, call) in cases(numel).items():
            fused = seconds_per_call(call, nbytes, args.repeats)
            with mock.patch.object(kernels, "triton", None):  # the torch path, as without triton
                unfused = seconds_per_call(call, nbytes, args.repeats)
            copy = copy_seconds(nbytes, args.repeats)
            rows.append([
                name, f"{numel:,}", f"{nbytes / 1e6:.1f}", f"{nbytes / fused / 1e9:.0f}",
                f"{nbytes / unfused / 1e9:.0f}", f"{nbytes / copy / 1e9:.0f}", f"{copy / fused:.0%}",
                f"{unfused / fused:.2f}x",
            ])  # fmt: skip
        torch.cuda.empty_cache()
    header = ["operation", "elements", "MB moved", "fused GB/s", "unfused GB/s", "copy GB/s", "fused / copy",
              "fused speed-up"]  # fmt: skip
    table("Fused kernels against the torch path and a device copy", header, rows)


if __name__ == "__main__":
    main()
