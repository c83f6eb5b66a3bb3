"""What the demo data modules share: the optional-import check, a seeded split and the
DataLoader construction (argument checks: :mod:`lightning_spectral._checks`)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["LoaderMixin", "require_optional", "seeded_split"]


def require_optional(module: str, package: str, user: str) -> None:
    """Import ``module`` now, so that a missing optional dependency stops the constructor instead
    of ``trainer.fit`` (where ``setup`` would first import it, after the model was built)."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{user} needs {package}, which could not be imported ({err}). It is part of the "
            'examples extra: pip install "lightning-spectral[examples]"'
        ) from err


def seeded_split(n: int, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Split ``range(n)`` into consecutive chunks of ``sizes`` after a seeded permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chunks, start = [], 0
    for size in sizes:
        chunks.append(perm[start : start + size])
        start += size
    return chunks


class LoaderMixin:
    """DataLoader construction shared by the three modules.

    The training loader shuffles with its own ``torch.Generator`` seeded from ``seed``, so the
    batch order does not depend on (or disturb) the global RNG and two runs with the same seed see
    the same batches. Evaluation loaders never shuffle.
    """

    batch_size: int
    num_workers: int
    seed: int

    def _loader(self, dataset: Dataset | None, *, train: bool) -> DataLoader:
        if dataset is None:  # the dataloader hooks call setup() first
            raise RuntimeError(f"{type(self).__name__}.setup() did not build this split")
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
