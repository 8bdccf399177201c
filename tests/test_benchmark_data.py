"""The convergence benchmark's data and measures: the MNIST loader on small IDX files written here (no download),
the generated augmented digits, temporal efficiency, and one small sweep through the driver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import common  # noqa: E402
import convergence  # noqa: E402


def test_idx_files_load_as_the_paper_used_mnist(tmp_path):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    convergence.write_idx(tmp_path / "train-images-idx3-ubyte", train_images)
    convergence.write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 9], dtype=np.uint8))
    convergence.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_images)  # gzipped, as MNIST is distributed
    convergence.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 8, 9], dtype=np.uint8))
    x_train, y_train, x_val, y_val = convergence.load_mnist(tmp_path)
    assert x_train.shape == (5, 784) and x_val.shape == (3, 784)
    assert torch.equal(x_train[1], torch.tensor(train_images[1].reshape(-1)))
    inputs = common.as_inputs(x_val)
    assert inputs.dtype == torch.float32 and torch.equal(inputs * 255.0, x_val.float())
    assert 0.0 <= float(inputs.min()) and float(inputs.max()) <= 1.0
    assert y_train.tolist() == [0, 1, 2, 3, 9] and y_val.tolist() == [7, 8, 9]


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    convergence.write_idx(tmp_path / "short", np.zeros((4, 2), dtype=np.uint8))
    data = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="header says"):
        convergence.read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        convergence.read_idx(tmp_path / "png")


def test_offline_digits_have_the_papers_input_size():
    x_train, y_train, x_val, y_val = convergence.load_digits_784()
    assert x_train.shape[1] == x_val.shape[1] == 784
    assert len(x_train) + len(x_val) == 1797


def test_augmented_digits_are_an_mnist_shaped_set_made_once(tmp_path):
    directory = convergence.augmented_digits(tmp_path, train=2000, val=500, seed=3)
    x_train, y_train, x_val, y_val = convergence.load_mnist(directory)
    assert x_train.shape == (2000, 784) and x_val.shape == (500, 784) and x_train.dtype == torch.uint8
    assert torch.bincount(y_train, minlength=10).min() > 120  # every class, roughly balanced
    assert 0 < float(common.as_inputs(x_train).mean()) < 0.5  # strokes on a dark frame, as MNIST
    assert int(x_train.view(-1, 28, 28)[:, :, 0].max()) < 255  # the digit does not fill the frame
    stamp = (directory / "train-images-idx3-ubyte").stat().st_mtime_ns
    assert convergence.augmented_digits(tmp_path, train=2000, val=500, seed=3) == directory
    assert (directory / "train-images-idx3-ubyte").stat().st_mtime_ns == stamp  # same recipe: not rewritten
    again = convergence.augmented_digits(tmp_path / "again", train=2000, val=500, seed=3)
    assert torch.equal(convergence.load_mnist(again)[0], x_train)  # reproducible from its seed
    other = convergence.augmented_digits(tmp_path / "other", train=2000, val=500, seed=4)
    assert not torch.equal(convergence.load_mnist(other)[0], x_train)


def test_temporal_efficiency_on_hand_computed_curves():
    faster = [(0.0, 0.0), (2.0, 1.0), (4.0, 1.0)]
    slower = [(0.0, 0.0), (4.0, 1.0), (8.0, 1.0)]
    assert convergence.area_until(slower, 4.0) == pytest.approx(2.0)
    assert convergence.area_until(slower, 6.0) == pytest.approx(4.0)
    # up to the shorter run's end (4 s): areas 3 and 2
    assert convergence.temporal_efficiency(faster, slower) == pytest.approx(1.5)
    assert convergence.temporal_efficiency(slower, faster) == pytest.approx(2 / 3)


times = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=12).map(lambda gaps: np.cumsum([0.0, *gaps]))
accuracies = st.floats(0.01, 1.0)


@st.composite
def curves(draw):
    t = draw(times)
    return [(float(x), draw(accuracies)) for x in t]


@given(curves(), curves(), st.floats(0.1, 10.0))
def test_temporal_efficiency_laws(a, b, factor):
    assert convergence.temporal_efficiency(a, a) == pytest.approx(1.0)
    assert convergence.temporal_efficiency(a, b) * convergence.temporal_efficiency(b, a) == pytest.approx(1.0)
    scaled = [(t, factor * acc) for t, acc in a]
    assert convergence.temporal_efficiency(scaled, a) == pytest.approx(factor)


def test_one_small_sweep_writes_the_table_and_plot_and_extends(tmp_path):
    """The one-command reproduction, shrunk: 2 workers, a small MLP, one pass over a generated set, one seed;
    then the same directory extended by a second ADAG seed, which runs only that one."""
    command = [
        sys.executable,
        str(Path(convergence.__file__)),
        "--dataset",
        "augmented",
        "--data-dir",
        str(tmp_path / "data"),
        "--workers",
        "2",
        "--windows",
        "4",
        "--epochs",
        "1",
        "--hidden",
        "32",
        "--probe-seconds",
        "0.5",
        "--out",
        str(tmp_path / "out"),
        "--algorithms",
    ]
    subprocess.run([*command, "adag", "aeasgd", "--seeds", "0"], check=True, timeout=300, capture_output=True)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["name"] for r in results] == ["adag-n2-w4-s0", "aeasgd-n2-w4-s0"]
    assert all(r["val_acc"] > 0.3 and r["curve"][0][0] == 0.0 for r in results)  # chance is 0.1
    table = (tmp_path / "out" / "table.md").read_text()
    assert "augmented digits" in table
    adag_row = next(line for line in table.splitlines() if line.startswith("| 2 | ADAG | 4 | 1 |")).split("|")
    assert float(adag_row[9]) > 0  # commits
    assert float(adag_row[12]) > 0  # temporal efficiency against AEASGD, same n, λ and seed
    assert (tmp_path / "out" / "accuracy_vs_time.png").stat().st_size > 0

    extended = subprocess.run(
        [*command, "adag", "--seeds", "0", "1"], check=True, timeout=300, capture_output=True, text=True
    )
    assert extended.stdout.count("not re-run") == 1
    assert "| 2 | ADAG | 4 | 2 |" in (tmp_path / "out" / "table.md").read_text()
