"""LightningCLI for an image classifier with the spectral-bound regularizer.

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --trainer.callbacks.init_args.beta=0
    python examples/cli.py fit --config examples/configs/mnist/ff_penalty.yaml \\
        --data.data_dir=data --data.download=true

Any ``nn.Module`` can be the network (``model.model.class_path``) and any LightningDataModule
the data (``data.class_path``; scikit-learn's digits when the config names none); the callback
is configured in the YAML's ``trainer.callbacks``. ``examples/configs/`` holds the MNIST and
CIFAR-10 experiments of Singla & Feizi (ICLR 2021).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_spectral.demos import ImageClassifier


class SpectralCLI(LightningCLI):
    """LightningCLI whose ``data`` is any LightningDataModule, the digits by default."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A default class keeps configs that only set the digits' arguments working.
        parser.set_defaults({"data": {"class_path": "lightning_spectral.demos.DigitsDataModule"}})


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return SpectralCLI(
        ImageClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
