"""Table 4: one batched power-iteration step over many layers against one read of the weights."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.boundspeed.config import Config, Layer
from benchmarks.boundspeed.measure import interleaved
from lightning_spectral.functional import grouped_weight, init_singular_vectors, power_iteration_

Vectors = tuple[list[Tensor], list[Tensor]]


def _stacked_vectors(w: Tensor, seed: int) -> Vectors:
    """Singular-vector state of the stack ``w`` (one layer per leading index), all alike."""
    us, vs = init_singular_vectors(w.shape[1:], seed=seed, device=w.device, dtype=w.dtype)
    n = w.shape[0]
    return (
        [u.unsqueeze(0).repeat(n, *[1] * u.ndim) for u in us],
        [v.unsqueeze(0).repeat(n, *[1] * v.ndim) for v in vs],
    )


def batched_power_step(layers: list[Layer], cfg: Config) -> dict[str, float]:
    """Median seconds of one weight read and of one power-iteration step over every
    matricization of every layer (grouped by shape, stacked), in interleaved rounds."""
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for layer in layers:
        w = grouped_weight(layer.module.weight.detach(), layer.module.groups)
        groups.setdefault(tuple(w.shape), []).append(w)
    weights = [w for ws in groups.values() for w in ws]
    stacked = {shape: torch.stack(ws) for shape, ws in groups.items()}
    states = {shape: _stacked_vectors(w, cfg.seed) for shape, w in stacked.items()}

    def read_once() -> Tensor:
        return torch.stack([w.sum() for w in weights]).sum()

    def step_stacked() -> None:
        for shape, w in stacked.items():
            power_iteration_(w, *states[shape], n_iter=1)

    def step_with_stack() -> None:
        for shape, ws in groups.items():
            power_iteration_(torch.stack(ws), *states[shape], n_iter=1)

    ops = {"read": read_once, "step": step_stacked, "step_stack": step_with_stack}
    return {
        "layers": len(weights),
        "shapes": len(groups),
        "megabytes": sum(w.numel() * w.element_size() for w in weights) / 2**20,
        "rounds": cfg.batched_rounds,
        **interleaved(ops, cfg.batched_rounds, cfg.device),
    }
