from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_adag.flat import FlatState, Layout, all_finite, check_shareable


def model_with_everything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)  # frozen parameter
    return model


def test_every_shared_tensor_becomes_a_view_of_one_vector():
    model = model_with_everything()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = FlatState(model)
    # values survive the move into the vector
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    # trainable first: 3*4+4 (linear) + 4+4 (bn affine) + 4*2 (linear weight) = 32
    assert flat.trainable == 32
    # then the frozen bias (2) and the float buffers (running mean and var, 4 each); num_batches_tracked stays out
    assert flat.vector.numel() == 32 + 2 + 8
    assert "1.num_batches_tracked" not in flat.names
    flat.vector.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    assert float(model[1].running_var.abs().sum()) == 0


def test_optimizer_and_batchnorm_write_into_the_vector():
    model = model_with_everything()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    flat = FlatState(model)
    before = flat.vector.clone()
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()
    changed = flat.vector != before
    assert changed[: flat.trainable].any()  # parameters moved through their views
    assert changed[flat.trainable + 2 :].any()  # running statistics moved too
    assert not changed[flat.trainable : flat.trainable + 2].any()  # the frozen bias did not


def test_state_dict_entries_follow_the_layout():
    model = model_with_everything()
    flat = FlatState(model)
    other = torch.arange(flat.vector.numel(), dtype=torch.float32)
    entries = flat.state_dict_entries(other)
    assert torch.equal(entries["0.weight"].flatten(), other[:12])
    assert entries["0.weight"].shape == model[0].weight.shape


def test_layout_digest_depends_on_shapes_not_only_sizes():
    a = FlatState(nn.Linear(4, 6, bias=False)).layout
    b = FlatState(nn.Linear(6, 4, bias=False)).layout
    assert a.numel == b.numel and a.digest != b.digest


def test_the_layout_is_the_centers_so_16_bit_and_float32_models_share_it():
    float32 = FlatState(nn.Linear(3, 2)).layout
    assert FlatState(nn.Linear(3, 2).bfloat16()).layout == FlatState(nn.Linear(3, 2).half()).layout == float32
    assert FlatState(nn.Linear(3, 2).double()).layout != float32  # a float64 center is another center


def test_layout_json_round_trip_and_validation():
    layout = FlatState(nn.Linear(2, 2)).layout
    assert Layout.from_json(layout.to_json()) == layout
    with pytest.raises(ValueError, match="unsupported dtype"):
        Layout.from_json({**layout.to_json(), "dtype": "torch.int64"})
    with pytest.raises(ValueError, match="invalid layout sizes"):
        Layout.from_json({**layout.to_json(), "trainable": 0})


def test_a_model_without_trainable_parameters_is_refused_with_advice():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        check_shareable(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        check_shareable(nn.ReLU())


def test_a_non_persistent_buffer_stays_local():
    """A constant kept out of the state dict (here a causal mask of -inf) neither travels nor blocks training."""
    model = model_with_everything()
    model[2].register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1), persistent=False)
    flat = FlatState(model)
    assert "2.mask" not in flat.names and flat.vector.numel() == 32 + 2 + 8
    assert model[2].mask[0, 1] == float("-inf")


@pytest.mark.parametrize("where", ["buffer", "frozen", "trainable"])
def test_a_shared_tensor_holding_infinity_or_nan_is_refused_with_advice(where):
    model = model_with_everything()
    if where == "buffer":
        model[2].register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))
    else:
        parameter = model[2].bias if where == "frozen" else model[0].weight
        parameter.data[0] = float("nan")
    check_shareable(model)  # in the launching process: structure only
    with pytest.raises(ValueError, match=r"NaN and infinite values.*persistent=False"):
        FlatState(model)


def test_all_finite_sees_past_a_float16_sum_that_overflows():
    tensor = torch.ones(3 * 2**20 + 5, dtype=torch.float16)  # sums to 3M, past float16's 65504: several chunks
    assert math.isinf(tensor.sum().item()) and all_finite(tensor)
    tensor[-1] = float("nan")
    assert not all_finite(tensor)


def test_mixed_dtypes_are_refused_with_advice():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="several dtypes"):
        check_shareable(model)
