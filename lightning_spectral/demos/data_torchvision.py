"""MNIST and CIFAR-10 as LightningDataModules, read through ``torchvision.datasets``.

Nothing is downloaded unless the user passes ``download=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, Subset

from .._checks import check_int
from .data_common import LoaderMixin, require_optional, seeded_split

__all__ = [
    "MNISTDataModule",
    "CIFAR10DataModule",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]

#: A torchvision transform: a callable from a PIL image (or tensor) to a tensor.
Transform = Callable[[Any], Any]

# Per-channel statistics of the training sets, the values commonly used with these datasets.
MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)


class _TorchvisionDataModule(LoaderMixin, pl.LightningDataModule):
    """Common logic: a torchvision train set split into train / val, and the official test set."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes = 10

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        batch_size: int,
        download: bool,
        val_size: int,
        seed: int,
        num_workers: int,
        normalize: bool,
    ) -> None:
        super().__init__()
        require_optional("torchvision.datasets", "torchvision", type(self).__name__)
        batch_size = check_int("batch_size", batch_size, low=1)
        num_workers = check_int("num_workers", num_workers, low=0)
        val_size = check_int("val_size", val_size, low=0)
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.download = download
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.normalize = normalize
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def input_scale(self) -> float:
        """Pixel-space radius per unit of radius on the normalized input: ``min(std)``."""
        return min(self.std) if self.normalize else 1.0

    def _dataset(self, *, train: bool, transform: Transform | None,
                 download: bool = False) -> Dataset:
        raise NotImplementedError

    def _eval_transform(self) -> Transform:
        from torchvision import transforms

        steps = [transforms.ToTensor()]
        if self.normalize:
            steps.append(transforms.Normalize(self.mean, self.std))
        return transforms.Compose(steps)

    def _train_transform(self) -> Transform:
        return self._eval_transform()

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the only place that may download.
        if self.download:
            self._dataset(train=True, transform=None, download=True)
            self._dataset(train=False, transform=None, download=True)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            # Two views of the same files so validation images are not augmented.
            train_view = self._dataset(train=True, transform=self._train_transform())
            eval_view = self._dataset(train=True, transform=self._eval_transform())
            n = len(cast(Sized, train_view))
            if self.val_size >= n:
                raise ValueError(f"val_size={self.val_size} leaves no training data out of {n}")
            train_idx, val_idx = seeded_split(n, (n - self.val_size, self.val_size), self.seed)
            self.train_set = Subset(train_view, train_idx)
            self.val_set = Subset(eval_view, val_idx)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset(train=False, transform=self._eval_transform())

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, train=False)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST through ``torchvision.datasets.MNIST``: ``(1, 28, 28)`` images, 10 classes.

    Files are expected as torchvision lays them out, ``<data_dir>/MNIST/raw/*-ubyte``. Nothing is
    downloaded unless ``download=True`` is passed (then :meth:`prepare_data` fetches them).
    The last ``val_size`` images of a seeded permutation of the 60000 training images are held out
    for validation; the official 10000 test images form the test set. With ``normalize`` the
    images are standardized with :data:`MNIST_MEAN`, :data:`MNIST_STD` and ``input_scale`` is
    ``0.3081`` (see the module docstring).

    Args:
        data_dir: root directory holding (or receiving) the ``MNIST`` folder.
        batch_size: samples per batch.
        download: allow downloading the files in :meth:`prepare_data`.
        val_size: number of training images held out for validation.
        seed: seed of the train/val split and of the shuffling.
        num_workers: DataLoader worker processes.
        normalize: standardize with the dataset's mean and std.
    """

    mean = MNIST_MEAN
    std = MNIST_STD
    input_shape = (1, 28, 28)

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = "data",
        batch_size: int = 128,
        download: bool = False,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, download, val_size, seed, num_workers, normalize)
        self.save_hyperparameters()

    def _dataset(self, *, train: bool, transform: Transform | None,
                 download: bool = False) -> Dataset:
        from torchvision.datasets import MNIST

        return MNIST(str(self.data_dir), train=train, transform=transform, download=download)


def _cifar10_class(verify_checksums: bool) -> Callable[..., Dataset]:
    from torchvision.datasets import CIFAR10

    if verify_checksums:
        return CIFAR10

    class CIFAR10Unverified(CIFAR10):
        """torchvision's CIFAR10 with the md5 checks switched off (file presence still checked).

        ``torchvision.datasets.utils.check_integrity`` with ``md5=None`` only tests that the file
        exists; everything else (unpickling, reshaping, the ``batches.meta`` class names) is
        torchvision's own code.
        """

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10Unverified


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10``: ``(3, 32, 32)`` images, 10 classes.

    Files are expected in ``<data_dir>/cifar-10-batches-py`` (the python pickles). Nothing is
    downloaded unless ``download=True``. Training images are augmented as in He et al. (2016) and
    the paper's ResNet-32 runs (4-pixel padding + random 32x32 crop, horizontal flip) when
    ``augment``; validation images (held out of the training set, seeded) and test images are not.
    With ``normalize`` each channel is standardized with :data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`,
    and ``input_scale`` is ``min(CIFAR10_STD) = 0.2435``.

    torchvision verifies the md5 checksum of every CIFAR file. ``verify_checksums=False`` skips
    only that check (the files must still exist and be valid pickles): for copies re-packed by
    the user, and for the tests, which write small files in the real format.

    Args:
        data_dir: root directory holding (or receiving) ``cifar-10-batches-py``.
        batch_size: samples per batch (the paper uses 128).
        download: allow downloading the archive in :meth:`prepare_data`.
        val_size: number of training images held out for validation.
        seed: seed of the train/val split and of the shuffling.
        num_workers: DataLoader worker processes.
        normalize: standardize each channel.
        augment: random crop and flip on the training images.
        verify_checksums: check torchvision's md5 of every file.
    """

    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    input_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = "data",
        batch_size: int = 128,
        download: bool = False,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        normalize: bool = True,
        augment: bool = True,
        verify_checksums: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, download, val_size, seed, num_workers, normalize)
        if download and not verify_checksums:
            raise ValueError("download=True requires verify_checksums=True")
        self.augment = augment
        self.verify_checksums = verify_checksums
        self.save_hyperparameters()

    def _train_transform(self) -> Transform:
        if not self.augment:
            return self._eval_transform()
        from torchvision import transforms

        return transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                self._eval_transform(),
            ]
        )

    def _dataset(self, *, train: bool, transform: Transform | None,
                 download: bool = False) -> Dataset:
        cls = _cifar10_class(self.verify_checksums)
        return cls(str(self.data_dir), train=train, transform=transform, download=download)
