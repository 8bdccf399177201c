"""A GPU worker: pinned mailbox, side-stream copies, compressed and overlapped commits, precision plugins.

The worker tests run the same exchanges from a CPU worker and from a GPU worker against real servers and compare
the centers they produce; they need a CUDA device and skip cleanly without one. What they check that needs none (the
staging of every exchange, compressed and overlapped, through the fused kernels) also runs on the CPU, with the
Triton kernels interpreted (``TRITON_INTERPRET=1``) against the torch path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import running_server
from test_kernels import interpreted, needs_triton
from test_worker import make_model
from torch import nn

from lightning_adag.algorithms import ADAG
from lightning_adag.flat import FlatState
from lightning_adag.transports import connect
from lightning_adag.worker import Worker

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def big_model() -> nn.Module:
    """4.2M parameters: a center of five 4 MiB server shards, and copies long enough that a missing wait between
    the compute stream and the side stream would show."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 16))


def exchanges(device: str, transport: str, compression: torch.dtype | None, overlap: bool, model=make_model):
    """Twelve steps of made-up local progress, a commit every two, on a fresh server; the final center."""
    with running_server(transport) as server:
        flat = FlatState(model().to(device))
        algorithm = ADAG(2)
        client = connect(
            transport, server.address, 0, flat.layout, algorithm.spec(), b"k", 30, pin_memory=device == "cuda"
        )
        worker = Worker(flat, client, algorithm, compression, error_feedback=True, overlap=overlap)
        try:
            worker.offer_initial_center(0)
            worker.reset_to_center()
            if device == "cuda":
                assert client.mailbox.is_pinned()  # page-locked in place, shared memory or not
            generator = torch.Generator().manual_seed(0)
            for index in range(12):
                worker.theta.add_(1e-2 * torch.randn(worker.theta.shape, generator=generator).to(device))
                if index % 2:
                    worker.commit(2)
                worker.poll()
            worker.settle()
            worker.show_center()
            return worker.flat.vector.cpu().clone()
        finally:
            worker.close()


@needs_triton
@pytest.mark.parametrize(  # the two staging paths: a payload written into the mailbox, or staged beside it
    ("transport", "compression", "overlap"),
    [("tcp", None, True), ("shm", torch.bfloat16, True)],
    ids=["tcp-overlap", "shm-bf16-overlap"],
)
def test_the_triton_kernels_interpreted_commit_what_the_torch_path_would(transport, compression, overlap):
    with interpreted(True):
        triton = exchanges("cpu", transport, compression, overlap)
    with interpreted(False):
        reference = exchanges("cpu", transport, compression, overlap)
    assert not torch.equal(triton, exchanges_start()), "the exchanges moved nothing"
    # the interpreter rounds float32 to bfloat16 by truncation (torch rounds to nearest): a few units of a 16-bit
    # delta (deltas of about 1e-2; the exchanges move the center by about 4e-2)
    torch.testing.assert_close(triton, reference, rtol=1e-6, atol=2e-4 if compression else 1e-6)


def exchanges_start() -> torch.Tensor:
    return FlatState(make_model()).vector.clone()


@needs_cuda
@pytest.mark.parametrize(
    ("transport", "compression", "overlap", "model"),
    [
        ("shm", None, False, make_model),
        ("shm", torch.bfloat16, True, make_model),
        ("tcp", None, True, make_model),
        ("tcp", torch.bfloat16, False, make_model),
        ("shm", torch.bfloat16, False, big_model),
        ("tcp", None, True, big_model),
    ],
    ids=["shm", "shm-bf16-overlap", "tcp-overlap", "tcp-bf16", "big-shm-bf16", "big-tcp-overlap"],
)
def test_a_gpu_worker_commits_what_a_cpu_worker_would(transport, compression, overlap, model):
    on_cpu = exchanges("cpu", transport, compression, overlap, model)
    on_gpu = exchanges("cuda", transport, compression, overlap, model)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-5, atol=1e-6)  # compiled kernels may fuse a multiply-add


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["--precision", "16-mixed"],
        ["--precision", "bf16-mixed"],
        ["--precision", "bf16-true"],
        ["--compression", "bf16", "--overlap"],
    ],
    ids=["16-mixed", "bf16-mixed", "bf16-true", "bf16-wire-overlap"],
)
def test_a_gpu_worker_trains_the_digits(script, options):
    code = script.run("train.py", "--accelerator", "gpu", "--devices", "1", "--epochs", "4", "--window", "2", *options)
    assert code == 0, script.output()
    (result,) = script.results().values()
    assert result["validate"]["val_acc"] >= 0.85
    assert result["digest_after_validate"] == result["digest"]
