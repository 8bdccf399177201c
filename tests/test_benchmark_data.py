"""The benchmark's MNIST loader, on small IDX files written here (no download)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

SPEC = importlib.util.spec_from_file_location("convergence", Path(__file__).parents[1] / "benchmarks" / "convergence.py")
convergence = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(convergence)


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(convergence.IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(data)


def test_idx_files_load_as_the_paper_used_mnist(tmp_path):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", train_images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 9], dtype=np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_images)  # gzipped, as MNIST is distributed
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 8, 9], dtype=np.uint8))
    x_train, y_train, x_val, y_val = convergence.load_mnist(tmp_path)
    assert x_train.shape == (5, 784) and x_val.shape == (3, 784)
    assert torch.equal(x_train[1], torch.tensor(train_images[1].reshape(-1), dtype=torch.float32) / 255.0)
    assert 0.0 <= float(x_val.min()) and float(x_val.max()) <= 1.0
    assert y_train.tolist() == [0, 1, 2, 3, 9] and y_val.tolist() == [7, 8, 9]


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    write_idx(tmp_path / "short", np.zeros((4, 2), dtype=np.uint8))
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
