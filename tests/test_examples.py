"""The examples run as their docstrings say, each on a tiny budget: real worker and server processes, real data
files (written here), and the center's metrics printed at the end."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from convergence import write_idx  # noqa: E402

EXAMPLES = Path(__file__).parents[1] / "examples"


def write_patch_digits(directory: Path, train: int = 320, val: int = 100) -> Path:
    """MNIST's four IDX files (the test pair gzipped, as MNIST is distributed) holding an easy set: class k is a
    bright 6x6 patch at its own place on a noisy 28x28 frame."""
    rng = np.random.default_rng(0)
    for prefix, count, suffix in (("train", train, ""), ("t10k", val, ".gz")):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            row, col = divmod(int(label), 5)
            image[2 + 12 * row : 8 + 12 * row, 1 + 5 * col : 7 + 5 * col] = 255
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return directory


def printed_accuracy(output: str) -> float:
    found = re.findall(r"center variable validation accuracy.*: ([0-9.]+)", output)
    assert len(found) == 1, output  # printed once, by rank 0
    return float(found[0])


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` imported as a module, as ``python examples/<name>.py`` would run it but ``main()``."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mnist_trains_the_papers_mlp_from_idx_files(script, tmp_path):
    data = write_patch_digits(tmp_path)
    args = ("--data-dir", str(data), "--algorithm", "dynsgd", "--devices", "2", "--epochs", "3", "--batch-size", "16")
    code = script.run(str(EXAMPLES / "mnist.py"), *args, "--hidden", "64", "32", out=False, timeout=120)
    assert code == 0, script.output()
    assert "(dynsgd)" in script.output()
    assert printed_accuracy(script.output()) > 0.5, script.output()  # chance is 0.1


def test_mnist_without_its_files_says_which_are_missing(tmp_path, monkeypatch, capsys):
    mnist = load_example("mnist")
    monkeypatch.setattr(sys, "argv", ["mnist.py", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        mnist.main()
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "no train-images-idx3-ubyte[.gz]" in error and "four IDX files" in error


TINY_LM = ("--devices", "2", "--epochs", "1", "--chars", "20000", "--layers", "1", "--width", "32", "--heads", "2")
TINY_LM += ("--block", "32", "--batch-size", "16", "--warmup", "5", "--sample", "40")


@pytest.mark.slow
@pytest.mark.parametrize("options", [("--strategy", "adag", "--outer-momentum", "0.5"), ("--strategy", "ddp")])
def test_char_lm_learns_the_standard_library_and_records_its_curve(script, tmp_path, options):
    out = tmp_path / "curve"
    code = script.run(str(EXAMPLES / "char_lm.py"), *TINY_LM, *options, "--out", str(out), out=False, timeout=120)
    assert code == 0, script.output()
    result = json.loads((out / "curve.json").read_text())
    assert result["val_loss"] < math.log(256) - 0.5, script.output()  # below a uniform guess over bytes
    seconds, steps, losses = zip(*result["curve"])
    assert len(seconds) == 4 and list(seconds) == sorted(seconds)  # validated every quarter of the epoch
    assert losses[-1] < losses[0]
    assert f"validation loss ({options[1]}): " in script.output()


def test_char_lm_keeps_the_causal_mask_out_of_the_state_dict():
    char_lm = load_example("char_lm")
    model = char_lm.CharLM(layers=2, width=16, heads=2, block=8)
    assert not any("mask" in name for name in model.state_dict())
    x = torch.randint(0, 256, (1, 8))
    changed = x.clone()
    changed[0, 5:] = (x[0, 5:] + 1) % 256
    assert torch.equal(model(x)[0, :5], model(changed)[0, :5])  # no position sees a later one


def test_char_lm_refuses_adag_options_under_ddp(monkeypatch, capsys):
    char_lm = load_example("char_lm")
    monkeypatch.setattr(sys, "argv", ["char_lm.py", "--strategy", "ddp", "--outer-momentum", "0.9"])
    with pytest.raises(SystemExit):
        char_lm.main()
    assert "--outer-momentum" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_with_the_strategy_and_its_options_from_yaml(script):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs the examples extra: pip install -e '.[examples]'")
    options = ("--trainer.devices=2", "--trainer.max_steps=12", "--trainer.enable_progress_bar=false")
    overrides = ("--trainer.strategy.init_args.algorithm.init_args.outer_momentum=0.5",)
    config = str(EXAMPLES / "config.yaml")
    code = script.run(str(EXAMPLES / "cli.py"), "fit", "--config", config, *options, *overrides, out=False)
    assert code == 0, script.output()
    assert "ADAG(window=4, outer_momentum=0.5, outer_lr=1.0)" in script.output()  # the YAML's window, the override
    assert printed_accuracy(script.output()) > 0.3, script.output()  # chance is 0.1
