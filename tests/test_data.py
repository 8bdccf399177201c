"""Dynamic data assignment in real Trainer runs: the work follows each worker's speed, every sample of an epoch is
trained once, validation and checkpoints line up, a resume continues where the checkpoint stood."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler

from lightning_adag import ADAGStrategy
from lightning_adag.sampling import static_reason

DIGITS_TRAIN = 1437  # examples/digits.py's 80 % split of scikit-learn's 1,797 digits


def epoch_order(epoch: int, seed: int = 0) -> list[int]:
    return torch.randperm(DIGITS_TRAIN, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


@pytest.mark.slow
def test_a_slow_worker_trains_less_every_sample_is_trained_once_and_a_mid_epoch_resume_continues_exactly(script):
    slow = ("--slow-rank", "1", "--slow-sleep", "0.03")  # rank 1 sleeps 30 ms a step
    every_half = ("--window", "2", "--val-check-interval", "0.5", "--save-at-validation")
    code = script.run("train.py", "--epochs", "2", *every_half, *slow)
    assert code == 0, script.output()
    fast, slow = (script.results()[rank] for rank in (0, 1))
    for epoch in ("0", "1"):
        trained = fast["trained_indices"][epoch] + slow["trained_indices"][epoch]
        assert sorted(trained) == list(range(DIGITS_TRAIN)), epoch  # each once, none left out
        assert len(fast["trained_indices"][epoch]) > 2 * len(slow["trained_indices"][epoch])
    assert fast["global_step"] > 2 * slow["global_step"]
    assert fast["validations"] == slow["validations"] == 4  # twice per epoch (at its half and its end), on both
    assert fast["metrics"]["adag/samples"] > slow["metrics"]["adag/samples"] > 0
    assert fast["sampler"][0] == "DynamicSampler"

    # resumed from the checkpoint of the first, mid-epoch validation: neither repeats nor skips a sample
    saved = (script.out / "ckpt").glob("epoch=0-*.ckpt")
    first = min(saved, key=lambda path: int(path.name.split("step=")[1].split("-")[0]))
    position = torch.load(first, weights_only=True)["adag"]["data"]
    assert position["epoch"] == 0 and 0 < position["position"] < DIGITS_TRAIN
    for result in script.out.glob("rank*.json"):
        result.unlink()
    code = script.run("train.py", "--epochs", "2", "--window", "2", "--resume", str(first))
    assert code == 0, script.output()
    results = script.results().values()
    rest_of_epoch = sorted(i for r in results for i in r["trained_indices"]["0"])
    assert rest_of_epoch == sorted(epoch_order(0)[position["position"] :])
    assert sorted(i for r in results for i in r["trained_indices"]["1"]) == list(range(DIGITS_TRAIN))


def test_static_assignment_where_dynamic_cannot_apply_and_says_why():
    trainer = L.Trainer(strategy=ADAGStrategy(), accelerator="cpu", devices=2, logger=False)
    data = TensorDataset(torch.zeros(8, 1))

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    assert static_reason(trainer, DataLoader(data, batch_size=2, shuffle=True)) is None
    assert "IterableDataset" in static_reason(trainer, DataLoader(Stream(), batch_size=2))
    weighted = DataLoader(data, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8))
    assert "sampler of its own (WeightedRandomSampler)" in static_reason(trainer, weighted)
    assert "batch_sampler" in static_reason(trainer, DataLoader(data, batch_sampler=[[0, 1], [2, 3]]))
    stepped = L.Trainer(strategy=ADAGStrategy(), accelerator="cpu", devices=2, logger=False, max_steps=10)
    assert "max_steps" in static_reason(stepped, DataLoader(data, batch_size=2))
    every = L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=5)
    saving = L.Trainer(strategy=ADAGStrategy(), accelerator="cpu", devices=2, logger=False, callbacks=[every])
    assert "every_n_train_steps=5" in static_reason(saving, DataLoader(data, batch_size=2))
