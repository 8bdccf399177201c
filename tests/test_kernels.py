"""The fused kernels against their torch reference: the Triton code through Triton's interpreter on the CPU (forced by
``TRITON_INTERPRET=1`` around each call), and compiled for CUDA when a GPU is present."""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_adag import kernels
from lightning_adag.kernels import BLOCK, elastic_exchange, fold_center, install_center, window_delta

needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(
    kernels.triton is None or not torch.cuda.is_available(), reason="needs a CUDA device and triton"
)

F32 = torch.float32
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
# The edges of the last, partial block and a few odd primes, plus anything up to three blocks.
EDGES = [1, 2, 7, 4093, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 1]
SIZES = st.one_of(st.sampled_from(EDGES), st.integers(1, 3 * BLOCK))
INTERPRETED = settings(max_examples=30, deadline=None)  # each interpreted call takes milliseconds


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="no triton wheel here")
def test_triton_is_there_so_the_interpreted_kernel_tests_run():
    """Where the test extras install triton, its absence would silently skip every Triton test below."""
    assert kernels.triton is not None, "pip install -e '.[test]' installs triton on Linux x86_64"


@contextmanager
def interpreted(on: bool):
    """``TRITON_INTERPRET`` set (Triton's interpreter) or unset (the torch path for CPU tensors) for the block."""
    with mock.patch.dict(os.environ):
        os.environ.pop("TRITON_INTERPRET", None)
        if on:
            os.environ["TRITON_INTERPRET"] = "1"
        yield


# AEASGD's alpha (rho x elastic_lr; the paper's is 0.05). Smaller ones make subnormal results, where Triton's CPU
# interpreter (numpy) and torch flush differently: not a case a worker meets.
ALPHAS = st.just(0.0) | st.floats(1e-6, 1.0)


def vectors(seed: int, size: int, *dtypes: torch.dtype, device: str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator).to(device, dtype) for dtype in dtypes]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tolerance: torch.Tensor | float = 0.0):
    """Same dtype, and elementwise within ``tolerance`` (bit for bit where it is 0)."""
    assert actual.dtype == expected.dtype
    error = (actual.cpu().double() - expected.cpu().double()).abs()
    assert (error <= tolerance).all(), f"off by up to {error.max()}"


def units(dtype: torch.dtype, magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` units in the last place of ``dtype`` (its epsilon) relative to ``|magnitude|``, elementwise."""
    return count * torch.finfo(dtype).eps * magnitude.cpu().double().abs()


def interpreted_units(dtype: torch.dtype) -> int:
    """The interpreter rounds float32 to bfloat16 by truncation (compiled code and torch round to nearest even): one
    unit for that, and one for a later rounding it may shift. Every other dtype matches bit for bit."""
    return 2 if dtype == torch.bfloat16 else 0


@needs_triton
@INTERPRETED
@given(size=SIZES, param=DTYPES, wire=DTYPES, steps=st.integers(1, 64), feedback=st.booleans(), seed=st.integers(0, 99))
def test_window_delta_interpreted_matches_reference(size, param, wire, steps, feedback, seed):
    theta, theta0, residual = vectors(seed, size, param, param, torch.float32)
    results = []
    for on in (True, False):
        out, kept = torch.empty(size, dtype=wire), residual.clone() * 1e-3 if feedback else None
        with interpreted(on):
            window_delta(theta, theta0, 1 / steps, out, kept)
        results.append((out, kept))
    (out, kept), (ref_out, ref_kept) = results
    exact = (theta.float() - theta0.float()) * (1 / steps) + (residual * 1e-3 if feedback else 0)
    assert_matches(out, ref_out, units(wire, exact, interpreted_units(wire)))
    if feedback:  # nothing is lost: what is sent plus what is kept is the exact delta, on either path
        assert torch.equal(out.float() + kept, exact)
        assert torch.equal(ref_out.float() + ref_kept, exact)


@needs_triton
@INTERPRETED
@given(size=SIZES, param=DTYPES, center_dtype=DTYPES, wire=DTYPES, alpha=ALPHAS, seed=st.integers(0, 99))
def test_elastic_exchange_interpreted_matches_reference(size, param, center_dtype, wire, alpha, seed):
    theta, center = vectors(seed, size, param, center_dtype)
    results = []
    for on in (True, False):
        local, out = theta.clone(), torch.empty(size, dtype=wire)
        with interpreted(on):
            elastic_exchange(local, center, alpha, out)
        results.append((local, out))
        # The worker moves by exactly what it sends.
        expected = (theta.float() - out.float()).to(param)
        assert_matches(local, expected, units(param, expected, interpreted_units(param) if on else 0))
    (local, out), (ref_local, ref_out) = results
    force = alpha * (theta.float() - center.float()).abs()
    assert_matches(out, ref_out, units(wire, force, interpreted_units(wire)))
    # A send rounded differently moves θ differently, and θ's own rounding may then differ too.
    loose = torch.bfloat16 in (param, wire)
    assert_matches(local, ref_local, units(param, ref_local, 2) + units(wire, force, 2) if loose else 0.0)


@needs_triton
@INTERPRETED
@given(size=SIZES, center_dtype=DTYPES, param=DTYPES, seed=st.integers(0, 99))
def test_install_center_interpreted_matches_reference(size, center_dtype, param, seed):
    (center,) = vectors(seed, size, center_dtype)
    for on in (True, False):
        theta, theta0 = torch.full((size,), float("nan"), dtype=param), torch.empty(size, dtype=param)
        with interpreted(on):
            install_center(center, theta, theta0)
        count = interpreted_units(param) if on and center_dtype != param else 0
        assert_matches(theta, center.to(param), units(param, center, count))
        assert torch.equal(theta0, theta)


@needs_triton
@INTERPRETED
@given(size=SIZES, center_dtype=DTYPES, param=DTYPES, seed=st.integers(0, 99))
def test_fold_center_interpreted_matches_reference(size, center_dtype, param, seed):
    center, theta, theta0 = vectors(seed, size, center_dtype, param, param)
    results = []
    for on in (True, False):
        local, start = theta.clone(), theta0.clone()
        with interpreted(on):
            fold_center(center, local, start)
        results.append((local, start))
        assert_matches(start, center.to(param), units(param, center, interpreted_units(param) if on else 0))
    (local, start), (ref_local, ref_start) = results
    expected = theta.float() + (center.float() - theta0.float())
    assert_matches(ref_local, expected.to(param))
    assert_matches(local, ref_local, units(param, expected, interpreted_units(param)))


@given(size=st.integers(1, 500), seed=st.integers(0, 99))
def test_fold_center_keeps_the_local_progress(size, seed):
    """The law overlapped commits rely on: folding a center in moves the window's start to it and keeps θ − θ⁰
    (the steps taken since the window started), up to one float32 rounding of each."""
    center, theta, theta0 = vectors(seed, size, torch.float32, torch.float32, torch.float32)
    progress, magnitude = theta - theta0, center.abs() + theta.abs() + theta0.abs()
    fold_center(center, theta, theta0)
    assert torch.equal(theta0, center)
    assert_matches(theta - theta0, progress, units(torch.float32, magnitude, 2))


@needs_triton
@INTERPRETED
@given(
    size=st.integers(1, 300), wire=st.sampled_from([torch.bfloat16, torch.float16]), commits=st.integers(1, 40),
    interpret=st.booleans(), seed=st.integers(0, 99),
)  # fmt: skip
def test_error_feedback_sends_everything_over_many_commits(size, wire, commits, interpret, seed):
    """Over many windows, the deltas sent plus the final residual sum to the exact deltas (up to float32 summation)."""
    generator = torch.Generator().manual_seed(seed)
    residual, out = torch.zeros(size), torch.empty(size, dtype=wire)
    sent, exact = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    for _ in range(commits):
        theta0 = torch.randn(size, generator=generator)
        theta = theta0 + 1e-3 * torch.randn(size, generator=generator)
        steps = int(torch.randint(1, 33, (1,), generator=generator))
        with interpreted(interpret):
            window_delta(theta, theta0, 1 / steps, out, residual)
        sent += out.double()
        exact += ((theta - theta0) * (1 / steps)).double()
    # Each commit folds the residual in with one float32 addition: allow one float32 rounding per commit.
    tolerance = commits * torch.finfo(torch.float32).eps * (exact.abs() + sent.abs() + 1e-3)
    assert ((sent + residual.double() - exact).abs() <= tolerance).all()


@pytest.mark.parametrize("interpret", [False, True] if kernels.triton is not None else [False])
def test_a_delta_beyond_the_wire_range_is_sent_in_pieces_not_as_infinity(interpret):
    theta, theta0 = torch.tensor([7e4, 1.0, -1e5]), torch.zeros(3)
    out, residual = torch.empty(3, dtype=torch.float16), torch.zeros(3)
    largest = torch.finfo(torch.float16).max
    with interpreted(interpret):
        window_delta(theta, theta0, 1.0, out, residual)
        assert out.tolist() == [largest, 1.0, -largest]
        assert residual.tolist() == [7e4 - largest, 0.0, -1e5 + largest]
        window_delta(theta0, theta0, 1.0, out, residual)  # the next window sends the rest
    assert out.tolist() == [7e4 - largest, 0.0, -1e5 + largest] and not residual.any()


@pytest.mark.parametrize(
    "path",
    ["torch", pytest.param("interpreted", marks=needs_triton), pytest.param("cuda", marks=needs_cuda)],
)
@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreting inf - inf
def test_a_diverged_delta_is_sent_non_finite_so_the_server_refuses_it(path, wire):
    """Clamping is for finite values past a 16-bit range; an infinity sent as the largest finite value would pass
    the server's check and fill the center with it."""
    device = "cuda" if path == "cuda" else "cpu"
    theta = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0], device=device)
    theta0, residual = torch.zeros(4, device=device), torch.zeros(4, device=device)
    out = torch.empty(4, dtype=wire, device=device)
    with interpreted(path == "interpreted"):
        window_delta(theta, theta0, 1.0, out, residual if wire != torch.float32 else None)
    out = out.cpu()
    assert out[:2].tolist() == [float("inf"), float("-inf")] and out[2].isnan() and out[3] == 1.0


def test_reference_path_rounds_once():
    """The torch path widens to float32 and rounds once per output (what the Triton kernels do)."""
    theta, theta0 = vectors(0, 1000, torch.bfloat16, torch.bfloat16)
    out = torch.empty(1000, dtype=torch.float16)
    with interpreted(False):
        window_delta(theta, theta0, 1 / 3, out)
    assert torch.equal(out, ((theta.float() - theta0.float()) * (1 / 3)).half())


def test_float64_takes_the_torch_path_in_float64():
    theta, theta0 = vectors(1, 100, torch.float64, torch.float64)
    out = torch.empty(100, dtype=torch.float64)
    with interpreted(True):
        window_delta(theta, theta0, 0.25, out)
    assert torch.equal(out, (theta - theta0) * 0.25)


@pytest.mark.parametrize(
    "call",
    [
        lambda v: window_delta(v.view(10, 10), v.view(10, 10), 1.0, v.view(10, 10)),
        lambda v: window_delta(v[::2], v[::2], 1.0, v[::2]),
        lambda v: window_delta(v, v[:50], 1.0, v),
        lambda v: window_delta(v, v, 1.0, v.clone(), residual=torch.zeros(100, dtype=torch.bfloat16)),
        lambda v: elastic_exchange(v, v.long(), 0.5, v.clone()),
        lambda v: install_center(v, v[1:], v[1:]),
    ],
    ids=["2-d", "strided", "sizes", "residual-dtype", "integer", "install-sizes"],
)
def test_rejects_what_is_not_a_flat_vector(call):
    with pytest.raises(ValueError):
        call(torch.zeros(100))


def test_empty_vectors_are_a_no_op():
    empty = torch.empty(0)
    with interpreted(kernels.triton is not None):
        window_delta(empty, empty, 1.0, empty.clone(), empty.clone())
        elastic_exchange(empty.clone(), empty, 0.5, empty.clone())
        install_center(empty, empty.clone(), empty.clone())
        fold_center(empty, empty.clone(), empty.clone())


# ------------------------------------------------------------------------------------------ compiled, on a GPU
@needs_cuda
@pytest.mark.parametrize("size", [1, BLOCK - 1, BLOCK + 1, 1_000_003])
@pytest.mark.parametrize(
    ("param", "wire"), [(F32, F32), (F32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float16, F32)]
)
def test_cuda_kernels_match_reference(size, param, wire):
    """Compiled code may fuse a multiply and an add into one FMA (one rounding fewer): allow two units."""
    theta, theta0, center, residual = vectors(size, size, param, param, torch.float32, torch.float32, device="cuda")
    residual *= 1e-3
    cpu = [t.cpu() for t in (theta, theta0, center, residual)]
    with interpreted(False):
        out, kept = torch.empty_like(theta, dtype=wire), residual.clone()
        window_delta(theta, theta0, 1 / 7, out, kept)
        ref_out, ref_kept = torch.empty(size, dtype=wire), cpu[3].clone()
        window_delta(cpu[0], cpu[1], 1 / 7, ref_out, ref_kept)
        exact = ref_out.float() + ref_kept
        # an FMA skips the rounding of the scaled difference: its error is relative to the terms, not their sum
        terms = ((cpu[0].float() - cpu[1].float()) / 7).abs() + cpu[3].abs()
        assert_matches(out, ref_out, units(torch.float32, terms, 2) + units(wire, exact, 1))
        assert_matches(out.float() + kept, exact, units(torch.float32, terms, 2))

        local, sent = theta.clone(), torch.empty_like(theta, dtype=wire)
        elastic_exchange(local, center, 0.3, sent)
        ref_local, ref_sent = cpu[0].clone(), torch.empty(size, dtype=wire)
        elastic_exchange(ref_local, cpu[2], 0.3, ref_sent)
        assert_matches(sent, ref_sent, units(torch.float32, ref_sent, 2) + units(wire, ref_sent, 1))
        # the worker moves by exactly what it sends, rounded once to its dtype (an FMA may skip one rounding)
        moved = (cpu[0].float() - sent.cpu().float()).to(param)
        terms = cpu[0].float().abs() + ref_sent.float().abs()
        assert_matches(local.cpu(), moved, units(torch.float32, terms, 2) + units(param, moved, 1))
        assert_matches(local, ref_local, units(param, ref_local, 2) + units(wire, ref_sent, 1))

        target, target0 = torch.empty_like(theta), torch.empty_like(theta)
        install_center(center, target, target0)

        folded, start = theta.clone(), theta0.clone()
        fold_center(center, folded, start)
        ref_folded, ref_start = cpu[0].clone(), cpu[1].clone()
        fold_center(cpu[2], ref_folded, ref_start)
    assert torch.equal(target.cpu(), cpu[2].to(param)) and torch.equal(target0, target)
    assert torch.equal(folded.cpu(), ref_folded) and torch.equal(start.cpu(), ref_start)


@needs_cuda
def test_cuda_offsets_past_two_to_the_31():
    """Elements past index 2**31 are reached (int64 offsets); needs about 13 GB of GPU memory."""
    size = 2**31 + 3
    center = torch.zeros(size, dtype=torch.float16, device="cuda")
    center[-3:] = torch.tensor([1.0, 2.0, 3.0])
    theta, theta0 = torch.empty_like(center), torch.empty_like(center)
    install_center(center, theta, theta0)
    assert theta[-3:].tolist() == theta0[-3:].tolist() == [1.0, 2.0, 3.0]
