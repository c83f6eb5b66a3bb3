"""Shared pieces of the callback tests: a tiny model, fixed data, and an independent reference.

Importable by name (``import helpers.callback``) so the DDP script's processes can use it too.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def tiny_net() -> nn.Sequential:
    """Two convolutions of equal shape (batched together by the callback), one other, a head."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return TensorDataset(x, y)


# Power-iteration settings under which the estimates have converged, for exact comparisons.
CONVERGED = dict(n_power_iterations=100, warmup_power_iterations=300)


def batches(batch_size: int, steps: int) -> list:
    """The first ``steps`` batches of :func:`dataset`, in order."""
    x, y = dataset().tensors
    return [(x[i * batch_size:(i + 1) * batch_size], y[i * batch_size:(i + 1) * batch_size])
            for i in range(steps)]


def loader(batch_size: int, n: int = 64) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=False)


class Module(pl.LightningModule):
    """Cross-entropy with SGD; ``output`` selects what training_step returns."""

    def __init__(self, net: nn.Module, lr: float = 0.1, output: str = "tensor") -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        if self.output == "dict":
            return {"loss": loss, "n": len(y)}
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def matricizations(weight: Tensor) -> list[Tensor]:
    """The paper's matrices T, R, S, U of a 2-d filter, written out (independent of the lib)."""
    co, ci, kh, kw = weight.shape
    return [
        weight.reshape(co, ci * kh * kw),
        weight.permute(0, 2, 1, 3).reshape(co * kh, ci * kw),
        weight.permute(0, 3, 1, 2).reshape(co * kw, ci * kh),
        weight.permute(0, 2, 3, 1).reshape(co * kh * kw, ci),
    ]


def ff_bound(module: nn.Module) -> Tensor:
    """Exact Fantastic Four bound sqrt(hw) * min ||M||_2 (conv, groups=1) or ||W||_2 (linear)."""
    w = module.weight
    if w.ndim == 2:
        return torch.linalg.matrix_norm(w, ord=2)
    norms = torch.stack([torch.linalg.matrix_norm(m, ord=2) for m in matricizations(w)])
    return math.sqrt(w.shape[2] * w.shape[3]) * norms.min()


def layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def hand_train(
    net: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    beta: float,
    lr: float = 0.1,
    accumulate: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> None:
    """Plain PyTorch: SGD on CE + beta * sum of exact FF bounds, ``accumulate`` batches a step."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    # float16 needs loss scaling, as Lightning's "16-mixed" does (same defaults, same skips).
    scaler = torch.amp.GradScaler("cpu", enabled=autocast_dtype == torch.float16)
    for i, (x, y) in enumerate(batches):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            task = F.cross_entropy(net(x), y)
        penalty = beta * torch.stack([ff_bound(m) for m in layers(net)]).sum()
        scaler.scale((task.float() + penalty) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
