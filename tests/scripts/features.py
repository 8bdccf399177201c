"""Lightning's features with strategy="adag", combined the way a user would, in as few runs as possible.

``python features.py fit --out OUT``: 2 workers fit a ``torch.compile``'d model (``--backend``) with bf16-mixed,
``sync_batchnorm``, sanity validation, gradient clipping, a per-step LR schedule, ``LearningRateMonitor``,
``EarlyStopping`` and ``ModelCheckpoint(every_n_train_steps=...)``, on ``accelerator="auto"``.

``python features.py evaluate --out OUT --ckpt CKPT``: in a fresh process, an uncompiled model on one worker
(``devices="auto"`` on a CPU-only machine) tests and predicts from the checkpoint, then fits briefly under each
registered strategy name.

Every rank writes what it saw to ``<out>/rank<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from digits import DigitsDataModule  # noqa: E402

import lightning_adag  # noqa: E402


class Digits(DigitsDataModule):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)  # 3 batches on each of 2 workers

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set.tensors[0], batch_size=64)


class Net(L.LightningModule):
    def __init__(self, decay: float = 1.0) -> None:
        super().__init__()
        self.decay = decay  # the learning rate's factor per optimizer step
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.sanity_batches = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        if self.trainer.sanity_checking:
            self.sanity_batches += 1
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch)

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}_correct", (logits.argmax(1) == y).sum().float(), reduce_fx="sum", sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.decay**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Recorder(Callback):
    """What the test checks, on every rank."""

    def __init__(self) -> None:
        self.sanity_state: list[float] = []
        self.norms_before_clipping: list[float] = []
        self.norms_stepped: list[float] = []
        self.lrs: list[tuple[int, float]] = []
        self.compiled = False

    def on_sanity_check_start(self, trainer, pl_module):
        self.sanity_state = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).tolist()

    def on_train_start(self, trainer, pl_module):
        self.compiled = pl_module._compiler_ctx is not None  # Lightning's mark of a torch.compile'd module
        trainer.optimizers[0].register_step_post_hook(lambda optimizer, args, kwargs: self._stepped(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms_before_clipping.append(_grad_norm(pl_module))

    def _stepped(self, pl_module) -> None:
        self.norms_stepped.append(_grad_norm(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


def _grad_norm(module: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()])).item()


def fit(args: argparse.Namespace) -> None:
    model, recorder = Net(args.decay), Recorder()
    trainer = L.Trainer(
        strategy="adag",
        accelerator="auto",
        devices=2,
        precision="bf16-mixed",
        sync_batchnorm=True,
        max_epochs=6,
        num_sanity_val_steps=2,
        gradient_clip_val=args.clip,
        log_every_n_steps=5,
        callbacks=[
            recorder,
            LearningRateMonitor(logging_interval="step"),
            EarlyStopping(monitor="val_loss", min_delta=10.0, patience=1),  # stops at the second validation
            ModelCheckpoint(Path(args.out, "ckpt"), every_n_train_steps=args.every, save_top_k=-1, save_last=True),
        ],
        logger=CSVLogger(args.out, name="logs", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(torch.compile(model, backend=args.backend), datamodule=Digits())
    result = {
        "sanity_batches": model.sanity_batches,
        "sanity_state": recorder.sanity_state,
        "compiled": recorder.compiled,
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "norms_before_clipping": recorder.norms_before_clipping,
        "norms_stepped": recorder.norms_stepped,
        "lrs": recorder.lrs,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "center": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
    }
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def evaluate(args: argparse.Namespace) -> None:
    data, model = Digits(), Net()
    options = {"accelerator": "auto", "devices": "auto", "logger": False, "default_root_dir": args.out}
    trainer = L.Trainer(strategy="adag", **options)
    (tested,) = trainer.test(model, datamodule=data, ckpt_path=args.ckpt, verbose=False)
    predicted = torch.cat(trainer.predict(model, datamodule=data, ckpt_path=args.ckpt))

    plain = Net()  # the checkpoint's weights, evaluated without Lightning
    plain.load_state_dict(torch.load(args.ckpt, weights_only=True)["state_dict"])
    data.setup("test")
    x, y = data.val_set.tensors
    with torch.no_grad():
        logits = plain.eval()(x)

    fits = {}
    for name in lightning_adag.algorithms.ALGORITHMS:  # every name the package registers
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        trainer = L.Trainer(
            strategy=name,
            max_epochs=1,
            limit_train_batches=6,
            limit_val_batches=0,
            enable_checkpointing=False,
            **options,
        )
        trainer.fit(model, datamodule=data)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        cb = next(c for c in trainer.callbacks if isinstance(c, lightning_adag.ADAGCallback))
        fits[name] = {"processes": trainer.world_size, "commits": cb.commits, "moved": not torch.equal(before, after)}
    result = {
        "tested_correct": tested["test_correct"],
        "direct_correct": (logits.argmax(1) == y).sum().item(),
        "predicted_matches": torch.allclose(predicted, logits, atol=1e-5),
        "fits": fits,
    }
    Path(args.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["fit", "evaluate"])
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="aot_eager", help="torch.compile's backend")
    p.add_argument("--ckpt", help="the checkpoint to evaluate")
    p.add_argument("--clip", type=float, default=0.05, help="gradient_clip_val")
    p.add_argument("--decay", type=float, default=0.98, help="the learning rate's factor per optimizer step")
    p.add_argument("--every", type=int, default=10, help="ModelCheckpoint(every_n_train_steps=...)")
    args = p.parse_args()
    L.seed_everything(int(os.environ.get("LOCAL_RANK", 0)))  # different inits per rank: the center unifies them
    (fit if args.mode == "fit" else evaluate)(args)


if __name__ == "__main__":
    main()
