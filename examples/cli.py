"""LightningCLI for an image classifier with the spectral-bound regularizer.

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.callbacks.init_args.beta=0

Any ``nn.Module`` can be the network (``model.model.class_path``); the data are scikit-learn's
digits (``--data.*``); the callback is configured in the YAML's ``trainer.callbacks``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_spectral.demos.data import DigitsDataModule
from lightning_spectral.demos.models import ImageClassifier


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        ImageClassifier,
        DigitsDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
