"""Run by tests/certify/test_certification.py: validate and test on 2 CPU processes (gloo) whose
batches have different input sizes (rank 0: 16x16, rank 1: 4x4); save what was logged.

Usage: python certification_ddp_script.py OUT_DIR. Lightning's "ddp" strategy relaunches this
script for rank 1; each rank writes its callback_metrics to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from torch.utils.data import DataLoader  # noqa: E402

from helpers.certify import PoolNet, random_images  # noqa: E402
from lightning_spectral import SpectralBoundRegularizer  # noqa: E402

warnings.filterwarnings("ignore")

SIZES = (16, 4)  # per rank


def rank_loader(rank: int) -> DataLoader:
    return DataLoader(random_images(20, SIZES[rank], 20 + rank), batch_size=10)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = PoolNet()
    trainer = pl.Trainer(
        callbacks=[SpectralBoundRegularizer(certify_epsilons=[0.0, 0.05])], logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        strategy="ddp", devices=2, accelerator="cpu", use_distributed_sampler=False,
    )
    rank = trainer.global_rank
    trainer.validate(module, rank_loader(rank))
    logged = {k: v.clone() for k, v in trainer.callback_metrics.items()}
    trainer.test(module, rank_loader(rank))
    logged.update({k: v.clone() for k, v in trainer.callback_metrics.items()})
    torch.save({"logged": logged, "state": module.state_dict()}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
