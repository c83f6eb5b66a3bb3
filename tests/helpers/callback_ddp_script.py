"""Run by tests/regularizer/test_callback_ddp.py: 2 CPU processes (gloo), penalized training,
save weights.

Usage: python callback_ddp_script.py OUT_DIR. Lightning's "ddp" strategy relaunches this script
for rank 1; each rank writes its parameters and the callback's vectors to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from helpers.callback import Module, dataset, quiet_trainer, tiny_net  # noqa: E402
from lightning_spectral.callback import SpectralBoundRegularizer  # noqa: E402

warnings.filterwarnings("ignore")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = tiny_net()
    beta = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    reg = SpectralBoundRegularizer(beta=beta, n_power_iterations=2, warmup_power_iterations=20)
    trainer = quiet_trainer(
        max_steps=3, callbacks=[reg], strategy="ddp", devices=2, accelerator="cpu",
        use_distributed_sampler=False,
    )
    # Lightning's own distributed sampler shuffles; this one deals indices round-robin, so the
    # two ranks' batches of 8 together are exactly the single process's batch of 16.
    data = dataset()
    sampler = DistributedSampler(data, num_replicas=2, rank=trainer.global_rank, shuffle=False)
    trainer.fit(Module(net), DataLoader(data, batch_size=8, sampler=sampler))
    torch.save(
        {"params": [p.detach() for p in net.parameters()], "reg": reg.state_dict()},
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
