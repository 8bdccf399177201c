"""A training script the multi-process tests run the way a user would: ``python train.py ...`` with the default
popen launcher. Every rank writes what it saw to ``<out>/rank<N>.json``."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import psutil
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from digits import DigitsDataModule  # noqa: E402

import lightning_adag  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        layers = [nn.Linear(64, 64)]
        if args.batchnorm:
            layers.append(nn.BatchNorm1d(64))
        self.net = nn.Sequential(*layers, nn.ReLU(), nn.Linear(64, 10))
        self.accuracy = MulticlassAccuracy(num_classes=10, average="micro")
        self.rank_sum = SumMetric()
        self.automatic_optimization = not args.manual

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.global_rank == self.args.slow_rank:
            time.sleep(self.args.slow_sleep)
        if self.args.fail_at_batch is not None and batch_idx == self.args.fail_at_batch:
            if self.args.fail_rank is None or self.global_rank == self.args.fail_rank:
                raise RuntimeError(f"injected failure on rank {self.global_rank}")
        if self.args.hang_at_batch is not None and batch_idx == self.args.hang_at_batch:
            marker = Path(self.args.out, f"hanging{self.global_rank}")
            marker.touch()
            while not self.trainer.received_sigterm:  # a long step, until the test sends a signal
                time.sleep(0.05)
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if batch_idx == self.args.diverge_at_batch and self.global_rank == self.args.fail_rank:
            loss = loss * float("nan")  # every parameter this step updates becomes NaN
        if self.args.manual:  # two optimizer steps a batch: the trainer's global_step counts both
            optimizers = self.optimizers()
            for optimizer in optimizers:
                optimizer.zero_grad()
            self.manual_backward(loss)
            for optimizer in optimizers:
                optimizer.step()
            return None
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.accuracy(logits, y)
        self.log("val_acc", self.accuracy)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(1)

    def on_validation_epoch_end(self):
        # epoch-level control plane: sync_dist mean of ranks, torchmetrics sum over ranks
        self.log("rank_mean", float(self.global_rank), sync_dist=True)
        self.rank_sum.update(self.global_rank + 1)
        self.log("rank_sum", self.rank_sum)
        self.log("constant", 1.0, sync_dist=True)

    def configure_optimizers(self):
        if self.args.manual:  # one optimizer for each layer
            return [
                torch.optim.Adam(layer.parameters(), lr=self.args.lr) for layer in self.net if list(layer.parameters())
            ]
        return torch.optim.Adam(self.parameters(), lr=self.args.lr)


class Recorder(Callback):
    """Collects what the tests check, on every rank."""

    def __init__(self, args):
        self.args = args
        self.commit_times: list[float] = []
        self.start_clock = None
        self.parts_served = []  # the parts of the center whose servers this process started
        self.final_clock = None
        self.server_stats = None
        self.commits = self.lost_commits = self.reconnections = None
        self.start_server_state = None
        self.start_center = None
        self.sampler = None
        self.moved_without_a_step = 0  # batches between which θ changed though no optimizer step ran
        self._last_batch_start = None
        self.commit_log: list[dict] = []  # every commit ADAGCallback made: its steps, and its receipt if one came back
        self.commits_in_batches = None  # how many of them were made during training batches (the rest at its end)
        self.logged: list[dict] = []  # the adag/ metrics, each time ADAGCallback logged them
        self.validated: list[dict] = []  # per validation during fit: what the model held, what the server held
        self.batches = 0
        self.evaluated: dict[str, dict] = {}  # validate/test/predict after fit: what the model held, and the worker

    def on_fit_start(self, trainer, pl_module):
        # right after the strategy joined the server; another worker may commit before this read: keep its clock
        clock, state = trainer.strategy.worker.server_state()
        self.start_server_state = {"clock": clock, **{name: tensor.tolist() for name, tensor in state.items()}}
        receipt = trainer.strategy.worker.fetch()  # the center in the server's dtype, whatever the model's
        self.start_center = {"clock": receipt.clock, "values": trainer.strategy.worker.center.tolist()}

    def on_train_start(self, trainer, pl_module):
        self.start_clock = trainer.strategy.worker.pulled_clock
        children = [child.cmdline() for child in psutil.Process().children()]
        self.parts_served = [line[line.index("--part") + 1] for line in children if "--part" in line]
        self._record_commits(trainer.strategy.worker)
        sampler = trainer.train_dataloader.sampler
        self.sampler = [type(sampler).__name__, getattr(sampler, "num_replicas", None), getattr(sampler, "rank", None)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = (trainer.global_step, torch.cat([p.detach().flatten() for p in pl_module.parameters()]))
        if self._last_batch_start is not None and self._last_batch_start[0] == now[0]:
            self.moved_without_a_step += not torch.equal(self._last_batch_start[1], now[1])
        self._last_batch_start = now

    def on_train_end(self, trainer, pl_module):
        worker = trainer.strategy.worker
        self.final_clock = worker.pulled_clock  # ADAGCallback's final pull ran before this
        self.commits = next(c for c in trainer.callbacks if isinstance(c, lightning_adag.ADAGCallback)).commits
        self.lost_commits, self.reconnections = worker.lost_commits, worker.reconnections
        self.server_stats = worker.client.stats()
        trainer.strategy.barrier("recorded_stats")  # rank 0 stops the server once every rank has asked

    def on_validation_start(self, trainer, pl_module):
        """During fit, after ADAGCallback showed the center: compare the model with the center the server holds.
        No worker commits between ADAGCallback's last barrier and this one's, so the two must be the same."""
        if trainer.state.fn != "fit":
            self._record_evaluation(trainer, pl_module)
            return
        worker = trainer.strategy.worker
        receipt = worker.fetch()
        model = worker.flat.vector[: worker.flat.trainable]
        center = worker.center.to(model.dtype)  # with 16-bit "true" precision, the model holds the center rounded
        self.validated.append({"clock": receipt.clock, "model": tensor_digest(model), "center": tensor_digest(center)})
        trainer.strategy.barrier("recorder_compared_the_center")

    def _record_evaluation(self, trainer, pl_module):
        worker = trainer.strategy.worker
        self.evaluated[trainer.state.fn] = {"digest": digest(pl_module), "joined": worker is not None}

    on_test_start = on_predict_start = _record_evaluation

    def _record_commits(self, worker):
        """Wrap this worker's ``commit`` to record each call (instrumentation only: the call itself is unchanged)."""
        commit = worker.commit

        def recorded(steps):
            receipt = commit(steps)
            entry = {"steps": steps}
            if receipt is not None:
                entry.update(clock=receipt.clock, staleness=receipt.staleness)
            self.commit_log.append(entry)
            return receipt

        worker.commit = recorded

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        self.commits_in_batches = len(self.commit_log)
        # ADAGCallback (the strategy puts it first) has logged, if it did, in this same hook: a new count of commits
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("adag/")}
        if logged and (not self.logged or logged["adag/commits"] != self.logged[-1]["adag/commits"]):
            self.logged.append(logged)
        cb = next(c for c in trainer.callbacks if isinstance(c, lightning_adag.ADAGCallback))
        if len(self.commit_times) < cb.commits:
            self.commit_times.append(time.time())
            if len(self.commit_times) == 1:
                Path(self.args.out, f"committing{trainer.global_rank}").touch()


class IndexedDigits(DigitsDataModule):
    """The digits, remembering which training samples this worker fetched (see ``Fetched``)."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.train_set = Fetched(self.train_set)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()


class Fetched(Dataset):
    def __init__(self, data: Dataset) -> None:
        self.data, self.indices = data, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.indices.append(index)
        return self.data[index]


class DataRecorder(Callback):
    """Per epoch, the training samples this worker trained (every fetched batch is trained by the epoch's end), and
    how often it validated."""

    def __init__(self, data: IndexedDigits) -> None:
        self.data, self.epochs, self.validations = data, {}, 0

    def on_train_epoch_end(self, trainer, pl_module):
        fetched = self.data.train_set.indices
        self.epochs[trainer.current_epoch] = list(fetched)
        fetched.clear()

    def on_validation_start(self, trainer, pl_module):
        self.validations += 1


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def digest(module: nn.Module) -> str:
    """A hash of what the center holds: every floating-point tensor of the state (integer buffers such as
    ``num_batches_tracked`` stay local to each worker)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not tensor.is_floating_point():
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def algorithm(args: argparse.Namespace) -> lightning_adag.Algorithm:
    if args.outer_momentum:
        return lightning_adag.ADAG(args.window or None, outer_momentum=args.outer_momentum)
    return lightning_adag.algorithms.resolve_algorithm(args.algorithm, args.window or None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--window", type=int, default=4, help="0: None, the strategy's heuristic")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--accumulate", type=int, default=1, help="Trainer(accumulate_grad_batches=...)")
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--slow-sleep", type=float, default=0.0)
    p.add_argument("--fail-at-batch", type=int)
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--diverge-at-batch", type=int, help="make the loss of --fail-rank NaN at this batch")
    p.add_argument("--hang-at-batch", type=int)
    p.add_argument("--batchnorm", action="store_true")
    p.add_argument("--early-stop", action="store_true")
    p.add_argument("--checkpoint", action="store_true", help="save the last checkpoint into <out>/ckpt")
    p.add_argument("--resume", help="checkpoint to resume from")
    p.add_argument("--save-after-fit", action="store_true", help="trainer.save_checkpoint into <out>/after_fit.ckpt")
    p.add_argument("--no-val", action="store_true")
    p.add_argument("--manual", action="store_true", help="manual optimization, two optimizer steps a batch")
    p.add_argument(
        "--evaluate-checkpoint", action="store_true", help="after fit, validate/test/predict(ckpt_path=last.ckpt)"
    )
    p.add_argument("--start-method", default="popen")
    p.add_argument("--transport", default="auto")
    p.add_argument("--aggregate", action="store_true", help="ADAGStrategy(aggregate='node')")
    p.add_argument("--server", help="host:port of a running adag-server")
    p.add_argument("--servers", type=int, default=1, help="server processes holding parts of the center")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--algorithm", default="adag", choices=sorted(lightning_adag.algorithms.ALGORITHMS))
    p.add_argument("--outer-momentum", type=float, default=0.0, help="ADAG with a server-side Nesterov optimizer")
    p.add_argument("--compression", choices=["bf16", "fp16"])
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--data", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--val-check-interval", type=float, default=1.0)
    p.add_argument("--save-at-validation", action="store_true", help="a checkpoint at every validation into <out>/ckpt")
    args = p.parse_args()

    L.seed_everything(int(os.environ.get("LOCAL_RANK", 0)))  # different inits per rank: the center must unify them
    model = Classifier(args)
    recorder = Recorder(args)
    callbacks = [recorder]
    if args.early_stop:
        callbacks.append(EarlyStopping(monitor="constant", patience=1, mode="min"))
    if args.checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=Path(args.out, "ckpt"), save_last=True))
    if args.save_at_validation:
        at_validation = ModelCheckpoint(
            Path(args.out, "ckpt"), "{epoch}-{step}-{val_loss:.4f}", "val_loss", save_top_k=-1
        )
        callbacks.append(at_validation)
    data = IndexedDigits(batch_size=args.batch_size)
    data_recorder = DataRecorder(data)
    callbacks.append(data_recorder)
    trainer = L.Trainer(
        strategy=lightning_adag.ADAGStrategy(
            algorithm=algorithm(args),
            start_method=args.start_method,
            transport=args.transport,
            server=args.server,
            compression=args.compression,
            overlap=args.overlap,
            data=args.data,
            aggregate="node" if args.aggregate else None,
            servers=args.servers,
        ),
        num_nodes=args.num_nodes,
        accelerator=args.accelerator,
        precision=args.precision,
        devices=args.devices,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        enable_checkpointing=args.checkpoint or args.save_at_validation,
        val_check_interval=args.val_check_interval,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0 if args.no_val else None,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    if args.save_after_fit:
        trainer.save_checkpoint(Path(args.out, "after_fit.ckpt"))
    result = {
        "rank": trainer.global_rank,
        "commit_times": recorder.commit_times,
        "start_clock": recorder.start_clock,
        "parts_served": recorder.parts_served,
        "final_clock": recorder.final_clock,
        "server_stats": recorder.server_stats,
        "commits": recorder.commits,
        "lost_commits": recorder.lost_commits,
        "reconnections": recorder.reconnections,
        "start_server_state": recorder.start_server_state,
        "start_center": recorder.start_center,
        "sampler": recorder.sampler,
        "moved_without_a_step": recorder.moved_without_a_step,
        "commit_log": recorder.commit_log,
        "commits_in_batches": recorder.commits_in_batches,
        "batches": recorder.batches,
        "window": trainer.strategy.algorithm.window,
        "logged": recorder.logged,
        "validated": recorder.validated,
        # what a commit carries, counted here from the module: trainable parameters, floating-point buffers
        "sizes": {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "values": sum(b.numel() for b in model.buffers() if b.is_floating_point()),
        },
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "digest": digest(model),
        "trained_indices": data_recorder.epochs,
        "validations": data_recorder.validations,
    }
    if not args.no_val:
        (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
        result["validate"] = metrics
        result["digest_after_validate"] = digest(model)
    if args.evaluate_checkpoint:
        last = Path(args.out, "ckpt", "last.ckpt")
        result["evaluate_checkpoint"] = {
            "validate": trainer.validate(model, datamodule=data, ckpt_path=last, verbose=False)[0],
            "test": trainer.test(model, datamodule=data, ckpt_path=last, verbose=False)[0],
            "predictions": int(sum(len(p) for p in trainer.predict(model, datamodule=data, ckpt_path=last))),
        }
    result["evaluated"] = recorder.evaluated
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
