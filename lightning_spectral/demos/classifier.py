"""A plain classification LightningModule and its losses.

* :class:`ImageClassifier` - cross-entropy training with SGD, logging ``train/loss``,
  ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``; the regularizer callback adds its own
  terms on top of it, so the module knows nothing about spectral norms.
* :func:`lipschitz_margin_loss` - the Lipschitz-margin cross-entropy of Tsuzuku et al.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import LRSchedulerConfigType, OptimizerLRScheduler
from torch import Tensor, nn

from ..functional.certified_losses import lipschitz_margin_loss

__all__ = ["ImageClassifier", "lipschitz_margin_loss"]


def _check_loss(loss: str, margin: float, temperature: float) -> None:
    if loss not in ("cross_entropy", "lipschitz_margin"):
        raise ValueError(f"loss must be 'cross_entropy' or 'lipschitz_margin', got {loss!r}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be finite and non-negative, got {margin!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and positive, got {temperature!r}")
    if loss == "cross_entropy" and (margin != 0 or temperature != 1):
        # Silently ignoring them would train something other than what the config says.
        raise ValueError(
            f"margin={margin!r} and temperature={temperature!r} only apply to "
            "loss='lipschitz_margin'; with loss='cross_entropy' leave them at 0 and 1"
        )


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification of any ``model`` mapping images to logits, trained with SGD.

    Logs ``train/loss`` (and returns it from :meth:`training_step`), ``val/loss`` and ``val/acc``,
    ``test/loss`` and ``test/acc``; epoch values are means weighted by batch size and synced across
    processes. ``model`` is excluded from the saved hyperparameters (it is a module, not a
    value), so checkpoints reload with ``ImageClassifier.load_from_checkpoint(path, model=...)``
    and LightningCLI takes it as a ``class_path``.

    Args:
        model: the network; ``forward`` returns ``model(x)``.
        lr: SGD learning rate (0.1 for ResNet-32 as in the paper).
        momentum: SGD momentum.
        weight_decay: L2 penalty in the optimizer (the paper uses 1e-4 or 0).
        lr_schedule: ``"none"``; ``"cosine"`` annealing to 0 over ``trainer.max_epochs``; or
            ``"step"``: multiply by ``gamma`` at each epoch of ``milestones`` (the paper:
            0.1 at epochs 100 and 150 of 200).
        milestones: epochs of the step schedule.
        gamma: factor of the step schedule.
        loss: training loss. ``"cross_entropy"``: ``CE(f(x), y)``. ``"lipschitz_margin"``: the
            Lipschitz-margin loss of Tsuzuku, Sato & Sugiyama (NeurIPS 2018),
            ``CE(temperature * (f(x) + margin * (1 - onehot(y))), y)``: every wrong logit is
            raised by ``margin``, so the loss keeps pushing the true logit's lead past
            ``margin``. With a network Lipschitz bound ``L`` (on the model's input), a lead of
            ``sqrt(2) * L * eps`` certifies radius ``eps``, so ``margin = sqrt(2) * L * eps``
            trains for radius ``eps`` (``L <= 1`` for a ReLU chain whose layers are constrained
            to 1). Validation and test losses are always plain cross-entropy.
        margin: logit offset of ``"lipschitz_margin"`` (must be 0 with cross-entropy).
        temperature: logit scale inside ``"lipschitz_margin"`` (must be 1 with cross-entropy):
            a 1-Lipschitz network has a narrow logit range on which plain cross-entropy
            saturates early.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"`` (``momentum`` unused).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: Literal["none", "cosine", "step"] = "none",
        milestones: Sequence[int] = (100, 150),
        gamma: float = 0.1,
        loss: Literal["cross_entropy", "lipschitz_margin"] = "cross_entropy",
        margin: float = 0.0,
        temperature: float = 1.0,
        optimizer: Literal["sgd", "adam"] = "sgd",
    ) -> None:
        super().__init__()
        _check_loss(loss, margin, temperature)
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        if lr_schedule not in ("none", "cosine", "step"):
            raise ValueError(f"lr_schedule must be 'none', 'cosine' or 'step', got {lr_schedule!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        hp = self.hparams
        if hp["loss"] == "lipschitz_margin":
            loss = lipschitz_margin_loss(logits, y, hp["margin"], hp["temperature"])
        else:
            loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{prefix}/loss", loss, batch_size=len(y), sync_dist=True)
        self.log(f"{prefix}/acc", acc, prog_bar=True, batch_size=len(y), sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> OptimizerLRScheduler:
        hp = self.hparams
        optimizer: torch.optim.Optimizer
        if hp["optimizer"] == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=hp["lr"],
                                         weight_decay=hp["weight_decay"])
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                weight_decay=hp["weight_decay"],
            )
        if hp["lr_schedule"] == "none":
            return optimizer
        scheduler: torch.optim.lr_scheduler.LRScheduler
        if hp["lr_schedule"] == "cosine":
            epochs = max(1, self.trainer.max_epochs or 1)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=list(hp["milestones"]), gamma=hp["gamma"]
            )
        lr_scheduler: LRSchedulerConfigType = {"scheduler": scheduler, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
