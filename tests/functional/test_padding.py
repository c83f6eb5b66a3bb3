"""Padding-mode factors against torch's own padding, one axis at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_spectral.functional.padding import axis_count, padding_factor, worst_axis_count

MODES = ("circular", "reflect", "replicate")
CONFIGS = [
    # k, stride, dilation, pl, pr
    (3, 1, 1, 1, 1),
    (3, 2, 1, 1, 1),
    (3, 1, 2, 2, 2),
    (2, 1, 1, 0, 1),
    (4, 3, 1, 2, 1),
    (1, 1, 1, 3, 0),
    (5, 2, 2, 4, 3),
    (3, 1, 1, 0, 0),
]


def _torch_accepts(mode: str, n: int, k: int, s: int, dil: int, pl: int, pr: int) -> bool:
    try:
        x = F.pad(torch.zeros(1, 1, n, dtype=torch.float64), (pl, pr), mode=mode)
        F.conv1d(x, torch.zeros(1, 1, k, dtype=torch.float64), stride=s, dilation=dil)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


def _reference_count(mode: str, n: int, k: int, s: int, dil: int, pl: int, pr: int) -> int:
    """Squared norm of the matrix from the input to the padded positions the conv reads."""
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, n)
    padded = F.pad(eye, (pl, pr), mode=mode).reshape(n, -1).T  # (n + pl + pr, n)
    ext = dil * (k - 1) + 1
    o = (n + pl + pr - ext) // s + 1
    if mode == "circular":
        # rows of the circular convolution on the n-grid selected by the outputs
        rows = [padded[i * s].argmax().item() for i in range(o)]
        sel = torch.zeros(o, n, dtype=torch.float64)
        sel[torch.arange(o), torch.tensor(rows)] = 1.0
        matrix = sel
    else:
        read = sorted({i * s + dil * t for i in range(o) for t in range(k)})
        matrix = padded[read]
    return round(torch.linalg.matrix_norm(matrix, ord=2).item() ** 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS)
def test_axis_count_matches_explicit_matrices_and_torch(mode, config) -> None:
    k, s, dil, pl, pr = config
    for n in range(1, 14):
        count = axis_count(mode, n, k, s, dil, pl, pr)
        accepted = _torch_accepts(mode, n, k, s, dil, pl, pr)
        assert (count is not None) == accepted, (mode, n, config)
        if accepted:
            assert count == _reference_count(mode, n, k, s, dil, pl, pr), (mode, n, config)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS)
def test_worst_count_covers_every_size(mode, config) -> None:
    worst = worst_axis_count(mode, *config)
    counts = [axis_count(mode, n, *config) for n in range(1, 80)]
    seen = max(c for c in counts if c is not None)
    assert worst >= seen
    # tail values are the documented ones (and are attained for some large size)
    assert worst <= max(seen, 2 if mode != "replicate" else 1 + max(config[3:]))


def test_known_values() -> None:
    # replicate on a 1-pixel input copies it 1 + pl + pr times
    assert worst_axis_count("replicate", 3, 1, 1, 1, 1) == 3
    # standard same-size circular padding reads every row once
    assert worst_axis_count("circular", 3, 1, 1, 1, 1) == 1
    assert padding_factor("zeros", [3, 3], [1, 1], [1, 1], [(1, 1), (1, 1)]) == 1.0
    assert padding_factor("reflect", [3, 3], [1, 1], [1, 1], [(1, 1), (1, 1)], (8, 8)) == 2.0
    with pytest.raises(ValueError, match="rejected by torch"):
        padding_factor("reflect", [3], [1], [1], [(2, 2)], (2,))
    with pytest.raises(ValueError, match="unknown padding_mode"):
        padding_factor("mirror", [3], [1], [1], [(1, 1)])
