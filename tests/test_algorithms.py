from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_adag.algorithms import ADAG, resolve_algorithm, suggested_window

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@given(st.lists(finite, min_size=1, max_size=64), st.lists(finite, min_size=1, max_size=64), st.integers(1, 64))
def test_adag_commits_the_window_difference_divided_by_its_steps(theta, theta0, steps):
    n = min(len(theta), len(theta0))
    theta, theta0 = torch.tensor(theta[:n]), torch.tensor(theta0[:n])
    out = torch.empty(n)
    ADAG(window=8).worker_delta(theta, theta0, steps, out)
    torch.testing.assert_close(out * steps, theta - theta0, rtol=1e-5, atol=1e-3)
    assert torch.equal(theta0 + out, theta0 + (theta - theta0) / steps)


def test_window_one_commits_the_whole_difference():
    theta, theta0, out = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0]), torch.empty(2)
    ADAG(window=1).worker_delta(theta, theta0, 1, out)
    assert torch.equal(out, theta - theta0)


def test_server_side_adds_the_delta():
    center = torch.tensor([1.0, 2.0])
    ADAG().server_apply(center, torch.tensor([0.5, -1.0]), staleness=3)
    assert torch.equal(center, torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize("window", [0, -3, 1.5, "8", True])
def test_invalid_windows_are_refused(window):
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        ADAG(window=window)


def test_resolve_algorithm():
    assert resolve_algorithm("adag", 5).window == 5
    instance = ADAG(3)
    assert resolve_algorithm(instance, None) is instance
    with pytest.raises(ValueError, match="conflicts"):
        resolve_algorithm(instance, 4)
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        resolve_algorithm("sgd", 4)


def test_suggested_window_is_the_thesis_heuristic():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))  # 3 layers with parameters
    assert suggested_window(5, mlp) == 4  # (5 + 3) / 2
    assert suggested_window(1, nn.Linear(2, 2)) == 1
