"""scikit-learn's handwritten digits as a LightningDataModule (nothing to download)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .._checks import check_int
from .data_common import LoaderMixin, require_optional, seeded_split

__all__ = ["DigitsDataModule"]


class DigitsDataModule(LoaderMixin, pl.LightningDataModule):
    """scikit-learn's handwritten digits as ``(1, 8, 8)`` float images in ``[0, 1]``, 10 classes.

    The 1797 images (pixel values 0..16, divided by 16) are split into train / val / test by a
    permutation seeded with ``seed``: the split is the same on every call and every machine.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
        seed: seed of the split and of the training loader's shuffling.
        num_workers: DataLoader worker processes (0: load in the main process, the fastest
            choice for a dataset this small).
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    #: Pixels are only divided by 16, not standardized: radii are already in [0, 1] pixel units.
    input_scale = 1.0

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        require_optional("sklearn.datasets", "scikit-learn", type(self).__name__)
        batch_size = check_int("batch_size", batch_size, low=1)
        num_workers = check_int("num_workers", num_workers, low=0)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < frac < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {frac!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction must leave training data, got "
                f"{val_fraction!r} + {test_fraction!r}"
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        n = len(targets)
        n_val = round(self.val_fraction * n)
        n_test = round(self.test_fraction * n)
        sizes = (n - n_val - n_test, n_val, n_test)
        train_idx, val_idx, test_idx = seeded_split(n, sizes, self.seed)
        full = TensorDataset(images, targets)
        self.train_set = Subset(full, train_idx)
        self.val_set = Subset(full, val_idx)
        self.test_set = Subset(full, test_idx)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, train=False)
