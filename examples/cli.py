"""Train the digits example through Lightning's CLI, the ADAG strategy and every option in a YAML config.

    pip install -e ".[examples]"
    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.devices=8 \\
        --trainer.strategy.init_args.algorithm.init_args.window=8

``examples/config.yaml`` names the strategy by class (``lightning_adag.ADAGStrategy``) and its algorithm by class
with its hyperparameters; ``strategy: adag`` works too, with the strategy's defaults. After ``fit`` it prints the
validation accuracy of the center variable and the algorithm the server ran.
"""

from __future__ import annotations

from digits import DigitsClassifier, DigitsDataModule
from lightning.pytorch.cli import LightningCLI

import lightning_adag  # noqa: F401  registers strategy="adag" for configs that name the strategy by its name


def main() -> None:
    # The config already lives beside this script: no copy of it is saved into the working directory.
    cli = LightningCLI(DigitsClassifier, DigitsDataModule, save_config_callback=None)
    if cli.subcommand == "fit":
        (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        if cli.trainer.is_global_zero:
            algorithm = cli.trainer.strategy.algorithm
            print(f"center variable validation accuracy: {metrics['val_acc']:.4f} ({algorithm!r})")


if __name__ == "__main__":
    main()
