"""Run by tests/regularizer/test_callback_fsdp.py: FSDP2 (``fully_shard``) on 2 CPU processes
(gloo).

Usage: python callback_fsdp_script.py OUT_DIR BETA CONSTRAINT [nan] (``none`` for no
constraint); one validation batch per epoch certifies at radius 0.1. With ``nan``, rank 1 alone
puts a NaN into its shard of the gradient of ``net.2`` at the second step. Lightning's
``ModelParallelStrategy`` relaunches this script for rank 1. Every convolution is sharded on its
own, and the remaining head is held by the sharded root ``net`` (which keeps its parameters
unsharded between forward and backward), so both cases are exercised. Each rank writes the
full (gathered) parameters and the callback's state to OUT_DIR/rank<r>.pt; rank 0's CSVLogger
writes the logged values.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from helpers.callback import Module, dataset, quiet_trainer, tiny_net  # noqa: E402
from lightning_spectral.callback import SpectralBoundRegularizer  # noqa: E402

warnings.filterwarnings("ignore")


class ShardedModule(Module):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for i, layer in enumerate(self.net):
            if isinstance(layer, torch.nn.Conv2d):
                # net.2 keeps its weights gathered from forward to backward (as the root does).
                fully_shard(layer, mesh=mesh, reshard_after_forward=i != 2)
        fully_shard(self.net, mesh=mesh)


class SaveFull(pl.Callback):
    """Gathers the full parameters on every rank (a collective) while the group is alive."""

    def __init__(self, out: Path, reg: SpectralBoundRegularizer) -> None:
        self.out, self.reg = out, reg

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [
            (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for p in pl_module.net.parameters()
        ]
        sharded = [
            isinstance(p, DTensor) and p.to_local().shape != p.shape
            for p in pl_module.net.parameters()
        ]
        bounds = self.reg.guaranteed_bounds()
        torch.save(
            {"params": params, "reg": self.reg.state_dict(), "bounds": bounds,
             "sharded": sharded},
            self.out / f"rank{trainer.global_rank}.pt",
        )


class NanInRankOneShard(pl.Callback):
    """Makes one weight non-finite on rank 1's shard only, at the second optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 1 and trainer.global_rank == 1:
            pl_module.net[2].weight.grad.to_local()[0, 0, 0, 0] = float("nan")


def main(out: Path, beta: float, constraint: float | None, nan: bool) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = tiny_net()
    reg = SpectralBoundRegularizer(
        beta=beta, constraint=constraint, n_power_iterations=2, warmup_power_iterations=20,
        certify_epsilons=[0.1],
    )
    callbacks = [reg, SaveFull(out, reg)] + ([NanInRankOneShard()] if nan else [])
    trainer = quiet_trainer(
        max_steps=3, callbacks=callbacks, devices=2, accelerator="cpu",
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        use_distributed_sampler=False, logger=CSVLogger(out, name="fsdp", version=0),
        log_every_n_steps=1, limit_val_batches=1, val_check_interval=3,
    )
    data = dataset()
    sampler = DistributedSampler(data, num_replicas=2, rank=trainer.global_rank, shuffle=False)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    trainer.fit(ShardedModule(net), loader, loader)


if __name__ == "__main__":
    c = None if sys.argv[3] == "none" else float(sys.argv[3])
    main(Path(sys.argv[1]), float(sys.argv[2]), c, sys.argv[4:] == ["nan"])
