"""Settings of one benchmark run, and the record of one layer that the tables are built from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

# Input size by output channels of ResNet-18's convolutions in the paper's table.
PAPER_SIZES = {64: 224, 128: 112, 256: 56, 512: 28}
# --quick keeps one ResNet-18 layer of each kind: 7x7 stride 2, 3x3, 3x3 stride 2, 1x1 stride 2.
QUICK_LAYERS = frozenset(
    {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.downsample.0"}
)


@dataclass
class Config:
    quick: bool
    threads: int
    device: torch.device
    seed: int = 0
    # Repeat a measurement until this many seconds are spent (at least once, at most max_repeats).
    time_budget: float = 1.0
    max_repeats: int = 7
    op_pi_tol: float = 1e-4
    op_pi_max_iter: int = 50
    digits_epochs: int = 15
    image_size: int = 224
    paper_sizes: dict[int, int] = field(default_factory=lambda: dict(PAPER_SIZES))
    # The FFT at the paper sizes runs on the n/fft_subsample grid (see table 1's caption).
    fft_subsample: int = 4
    # Layer whose FFT is also run on the n/2 grid to check the time extrapolation.
    fft_check_layer: str | None = "layer2.0.conv2"
    # Interleaved rounds of the batched power-iteration step (table 4).
    batched_rounds: int = 41


def quick_config(cfg: Config) -> Config:
    """``cfg`` reduced to a seconds-long smoke run: one repeat per measurement, tiny sizes."""
    return replace(
        cfg,
        quick=True,
        time_budget=0.0,
        max_repeats=1,
        op_pi_max_iter=30,
        digits_epochs=3,
        image_size=32,
        paper_sizes={64: 16, 128: 8, 256: 8, 512: 8},
        fft_subsample=2,
        fft_check_layer=None,
        batched_rounds=5,
    )


@dataclass
class Layer:
    name: str
    module: nn.Conv2d
    input_size: tuple[int, int]
    # Names of the layers of equal shape, stride and input size this one stands for (itself first).
    represents: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)
    winner: str = ""
    # True when the bounds were computed on the circular stride-1 stand-in, whose exact norm is FFT.
    bounds_on_standin: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return "x".join(str(s) for s in self.module.weight.shape)

    @property
    def count(self) -> int:
        return max(1, len(self.represents))
