"""Train a small causal transformer, character by character, on the Python standard library's own sources with
asynchronous ADAG workers on the CPU, or with DDP to compare.

    pip install -e ".[examples]"
    python examples/char_lm.py                               # 4 ADAG workers
    python examples/char_lm.py --strategy ddp                # the same run under DDP
    python examples/char_lm.py --outer-momentum 0.5          # ADAG with a server-side Nesterov outer optimizer

The text is every Python installation's own: the standard library's top-level ``.py`` files (found through
``sysconfig``), sorted by name and read as bytes (the sources are ASCII but for a few names), so this runs
offline. The first 90 % of ``--chars`` bytes are the training set and the last 10 % (other modules) the
validation set. The model is a GPT-style decoder (pre-LayerNorm blocks, causal self-attention whose mask is a
non-persistent buffer, so it stays on each worker and never travels in a commit), trained with AdamW, a linear
warm-up and cosine decay of the learning rate, and gradient clipping. It prints the validation loss of the center
variable (under DDP, of the model) and a sample of text; ``--out DIR`` writes the validation loss against training
time to ``DIR/curve.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_adag

VOCAB = 256  # bytes


def stdlib_sources(chars: int) -> torch.Tensor:
    """The first ``chars`` bytes of the standard library's top-level ``.py`` files, in name order."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = bytearray()
    for path in files:
        text += path.read_bytes()
        if len(text) >= chars:
            break
    return torch.frombuffer(bytes(text[:chars]), dtype=torch.uint8).long()


class Blocks(Dataset):
    """Consecutive, non-overlapping blocks of ``length`` bytes, each with the byte after it (the last target)."""

    def __init__(self, text: torch.Tensor, length: int) -> None:
        self.text, self.length = text, length

    def __len__(self) -> int:
        return (len(self.text) - 1) // self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.text[index * self.length : (index + 1) * self.length + 1]
        return chunk[:-1], chunk[1:]


class StdlibText(L.LightningDataModule):
    def __init__(self, chars: int = 1_000_000, block: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        self.chars, self.block, self.batch_size = chars, block, batch_size

    def setup(self, stage: str) -> None:
        text = stdlib_sources(self.chars)
        split = int(0.9 * len(text))
        self.train_set, self.val_set = Blocks(text[:split], self.block), Blocks(text[split:], self.block)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=128)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, block: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # Derived from the shape alone: not a parameter, not in the state dict, never committed to the server.
        self.register_buffer("mask", torch.ones(block, block, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:length, :length])
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, block: int) -> None:
        super().__init__()
        self.attention_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, block)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CharLM(L.LightningModule):
    """A decoder-only transformer over bytes, trained to predict each next byte."""

    def __init__(
        self,
        layers: int = 4,
        width: int = 128,
        heads: int = 4,
        block: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup: int = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(block, width)
        self.blocks = nn.Sequential(*(DecoderBlock(width, heads, block) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.head(self.norm(self.blocks(self.tokens(x) + self.positions(positions))))

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch), sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        # weight decay on matrices (weights, embeddings), none on vectors (biases, LayerNorm gains)
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0}]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.95))
        total, warmup = max(1, self.trainer.estimated_stepping_batches), self.hparams.warmup

        def scale(step: int) -> float:
            """Linear warm-up, then cosine decay to a tenth; a worker that trains past the estimate (with dynamic
            data a fast one takes more of each epoch) stays at the floor."""
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def sample(self, prompt: bytes, count: int, temperature: float = 0.8) -> bytes:
        x = torch.tensor(list(prompt), dtype=torch.long, device=self.device)[None]
        generator = torch.Generator(device=self.device).manual_seed(0)
        for _ in range(count):
            logits = self(x[:, -self.hparams.block :])[0, -1] / temperature
            x = torch.cat([x, torch.multinomial(logits.softmax(-1), 1, generator=generator)[None]], dim=1)
        return bytes(x[0].tolist())


class ValidationCurve(Callback):
    """On global rank 0: the validation loss at every validation during ``fit``, against seconds of training since
    ``on_train_start`` (process start-up excluded)."""

    def __init__(self) -> None:
        self.start, self.points = 0.0, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.state.fn == "fit" and not trainer.sanity_checking:
            seconds = time.perf_counter() - self.start
            self.points.append([round(seconds, 2), trainer.global_step, float(trainer.callback_metrics["val_loss"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["adag", "ddp"], default="adag")
    parser.add_argument("--devices", type=int, default=4, help="worker processes")
    parser.add_argument(
        "--window", type=int, default=None, help="ADAG's λ, local steps per commit (default: --devices)"
    )
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="ADAG's server-side Nesterov momentum μ")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="ADAG's server-side outer learning rate")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--chars", type=int, default=1_000_000, help="bytes of standard-library source to use")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=128, help="context length in characters")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps (each worker's own)")
    parser.add_argument("--val-every", type=float, default=0.25, help="validate every this fraction of an epoch")
    parser.add_argument("--sample", type=int, default=200, help="characters of text to print at the end")
    parser.add_argument("--out", type=Path, default=None, help="write DIR/curve.json: validation loss over time")
    args = parser.parse_args()
    if args.strategy == "ddp" and (args.outer_momentum != 0.0 or args.outer_lr != 1.0 or args.window is not None):
        parser.error("--window, --outer-momentum and --outer-lr are ADAG's: drop them, or use --strategy adag")
    if args.width % args.heads:
        parser.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")

    L.seed_everything(0)
    model = CharLM(args.layers, args.width, args.heads, args.block, args.lr, warmup=args.warmup)
    data = StdlibText(args.chars, args.block, args.batch_size)
    if args.strategy == "adag":
        algorithm = lightning_adag.ADAG(
            args.window or args.devices, outer_momentum=args.outer_momentum, outer_lr=args.outer_lr
        )
        strategy = lightning_adag.ADAGStrategy(algorithm=algorithm)
    else:
        strategy = "ddp"
    curve = ValidationCurve()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        gradient_clip_val=1.0,
        val_check_interval=args.val_every,
        callbacks=[curve],
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        loss = metrics["val_loss"]
        print(f"validation loss ({args.strategy}): {loss:.4f} ({loss / math.log(2):.3f} bits per character)")
        if args.sample:
            print(model.sample(b"def ", args.sample).decode("utf-8", errors="replace"))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            result = {"args": {**vars(args), "out": str(args.out)}, "curve": curve.points, "val_loss": loss}
            (args.out / "curve.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
