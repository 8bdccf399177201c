"""Fit a model whose parameters are all frozen: the strategy must refuse it before any worker process starts."""

import argparse

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

import lightning_adag  # noqa: F401  (registers strategy="adag")

parser = argparse.ArgumentParser()
parser.add_argument("--out")
parser.parse_args()
model = BoringModel()
model.requires_grad_(False)
trainer = L.Trainer(strategy="adag", accelerator="cpu", devices=2, max_epochs=1, logger=False)
trainer.fit(model)
