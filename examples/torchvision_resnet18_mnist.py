"""torchvision's ResNet-18 on a subset of MNIST with the spectral-bound regularizer.

A model and a data module that are not this project's: ``resnet18(num_classes=10)`` with a
1-channel first convolution, and a small LightningDataModule of your own over torchvision's
MNIST. Trains with the penalty, logs to CSV, checkpoints, certifies at validation and test,
predicts, and resumes from the last checkpoint::

    python examples/torchvision_resnet18_mnist.py --data-dir data --train-size 512
    python -m lightning_spectral.report lightning_logs/resnet18_mnist/version_0

The first fit logs to ``version_0``, the resumed one (and its test) to ``version_1``: a
CSVLogger writing to an existing version deletes what was there.

``--fast`` runs every step in seconds: torchvision's ResNet with one block per stage and the
last two stages left out (the guaranteed bounds of the 256- and 512-channel convolutions
take most of a validation), 64 training and 32 test images in batches of 16, one epoch
then one more on resume, no progress bars: the smoke test of tests/demos/test_example_resnet18.py.

MNIST is read from ``--data-dir`` (torchvision layout, ``MNIST/raw``); ``--download`` fetches
it there first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_spectral import SpectralBoundRegularizer

MEAN, STD = 0.1307, 0.3081  # of MNIST's training images


def mnist_resnet18(small: bool = False) -> nn.Module:
    """torchvision's ResNet-18 for 1-channel 28x28 digits: a 3x3 stride-1 first convolution.

    ``small``: torchvision's ``ResNet`` with one ``BasicBlock`` per stage, stages 3 and 4
    replaced by identities and a 128-feature head (fast bounds, for ``--fast``).
    """
    from torchvision.models.resnet import BasicBlock, ResNet, resnet18

    if small:
        net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
        net.layer3, net.layer4 = nn.Identity(), nn.Identity()
        net.fc = nn.Linear(128, 10)
    else:
        net = resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return net


class MNISTSubset(LightningDataModule):
    """The first ``train_size`` / ``val_size`` images of MNIST's train / test split."""

    def __init__(self, data_dir: str = "data", train_size: int = 512, val_size: int = 256,
                 batch_size: int = 64, download: bool = False) -> None:
        super().__init__()
        self.data_dir, self.download = data_dir, download
        self.train_size, self.val_size, self.batch_size = train_size, val_size, batch_size

    def prepare_data(self) -> None:
        from torchvision.datasets import MNIST

        if self.download:
            for train in (True, False):
                MNIST(self.data_dir, train=train, download=True)

    def setup(self, stage: str) -> None:
        from torchvision import transforms
        from torchvision.datasets import MNIST

        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
        train = MNIST(self.data_dir, train=True, transform=tf)
        test = MNIST(self.data_dir, train=False, transform=tf)
        self.train = Subset(train, range(self.train_size))
        self.val = Subset(test, range(self.val_size))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


class Classifier(LightningModule):
    """Cross-entropy classifier around any network; ``forward`` maps images to logits."""

    def __init__(self, lr: float = 0.05, small: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mnist_resnet18(small)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, test, predict and resume; returns the final test metrics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--val-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--bound-max-cost", type=float, default=0.0,
                        help="the callback's bound_max_cost (0: tight bounds only, fast)")
    parser.add_argument("--fast", action="store_true",
                        help="seconds, not minutes: a small torchvision ResNet, 64/32 images, "
                             "1 epoch (+1 on resume), bound_max_cost=0, no progress bars")
    args = parser.parse_args(argv)
    if args.fast:
        args.train_size, args.val_size, args.epochs, args.batch_size = 64, 32, 1, 16
        args.bound_max_cost, args.no_progress = 0.0, True

    seed_everything(0)
    data = MNISTSubset(args.data_dir, args.train_size, args.val_size, args.batch_size,
                       download=args.download)

    def trainer(max_epochs: int, version: int) -> Trainer:
        return Trainer(
            max_epochs=max_epochs, accelerator="cpu", devices=1, log_every_n_steps=2,
            logger=CSVLogger(args.log_dir, name="resnet18_mnist", version=version),
            callbacks=[
                # Penalize the Fantastic Four bounds of every conv and the head; certify at
                # l2 radii in pixel units (the data are standardized: input_scale = std).
                # bound_max_cost=0: the reported bounds are the tight bound only; the default
                # adds costlier, tighter bounds (minutes per validation for ResNet-18 on CPU).
                SpectralBoundRegularizer(beta=1e-3, certify_epsilons=[0.1, 0.3],
                                         input_scale=STD, bound_max_cost=args.bound_max_cost),
                ModelCheckpoint(dirpath=Path(args.log_dir) / "checkpoints", save_last=True),
            ],
            enable_progress_bar=not args.no_progress,
        )

    model = Classifier(small=args.fast)
    first = trainer(args.epochs, version=0)
    first.fit(model, data)
    # Resume: one more epoch from the last checkpoint (vectors and input sizes restored).
    resumed = trainer(args.epochs + 1, version=1)
    last = Path(args.log_dir) / "checkpoints" / "last.ckpt"
    resumed.fit(Classifier(small=args.fast), data, ckpt_path=str(last))
    metrics = resumed.test(resumed.lightning_module, data)[0]
    predictions = torch.cat(resumed.predict(resumed.lightning_module, data))
    print(f"predicted {len(predictions)} digits; test metrics: {metrics}")
    return metrics


if __name__ == "__main__":
    main()
