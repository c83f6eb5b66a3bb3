"""The bound functions run under a thread limit and restore torch's setting (no timings here)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_spectral.functional import (
    fantastic_four,
    gram_iteration_bound,
    layer_bounds,
    layer_spectral_bound,
    spectral_norm_exact,
    threads,
)
from lightning_spectral.functional.bounds import (
    circular_grid_norm,
    gram_kernel_bound,
    sampled_symbol_bound,
    tap_sum_bound,
)


class ThreadCounts(TorchFunctionMode):
    """Records ``torch.get_num_threads()`` at every torch function the block calls (attribute
    reads such as ``weight.shape``, which compute nothing, excepted)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "__get__":
            self.seen.add(torch.get_num_threads())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


CONV = nn.Conv2d(4, 6, 3, stride=2, padding=1)
MATRIX = torch.randn(3, 5, 4)
CALLS = {
    "layer_spectral_bound": lambda: layer_spectral_bound(CONV),
    "layer_bounds with input size": lambda: layer_bounds(CONV, (8, 8)),
    "fantastic_four": lambda: fantastic_four(CONV.weight),
    "tap_sum_bound": lambda: tap_sum_bound(CONV.weight),
    "gram_kernel_bound": lambda: gram_kernel_bound(CONV.weight, n_steps=1),
    "sampled_symbol_bound": lambda: sampled_symbol_bound(CONV.weight, (7, 7)),
    "circular_grid_norm": lambda: circular_grid_norm(CONV.weight, (5, 5)),
    "spectral_norm_exact": lambda: spectral_norm_exact(MATRIX),
    "gram_iteration_bound": lambda: gram_iteration_bound(MATRIX),
}


@pytest.mark.parametrize("name", CALLS)
def test_bounds_run_single_threaded_and_restore_the_setting(two_threads: None, name: str) -> None:
    with ThreadCounts() as mode:
        CALLS[name]()
    assert mode.seen == {1}
    assert torch.get_num_threads() == 2


def test_none_leaves_torchs_setting(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "BOUND_THREADS", None)
    with ThreadCounts() as mode:
        layer_spectral_bound(CONV)
    assert mode.seen == {2}


def test_setting_is_restored_after_an_error(two_threads: None) -> None:
    bad = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer_spectral_bound(bad)
    assert torch.get_num_threads() == 2


def test_limit_never_raises_the_count_and_nests(two_threads: None) -> None:
    with threads.limit_threads(4):
        assert torch.get_num_threads() == 2
        with threads.limit_threads(1):
            assert torch.get_num_threads() == 1
            with threads.limit_threads(2):
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_limit_rejects_a_bad_count(bad: object) -> None:
    with pytest.raises(ValueError, match="positive integer or None"), threads.limit_threads(bad):
        pass


def test_large_problems_keep_torchs_setting(two_threads: None) -> None:
    wide = threads.SMALL_SIDE + 1
    conv, matrix = nn.Conv2d(wide, wide, 1), torch.randn(2, wide, wide + 3)
    with ThreadCounts() as mode:
        layer_spectral_bound(conv)
        spectral_norm_exact(matrix)
    assert mode.seen == {2}


def test_the_size_is_per_group(two_threads: None) -> None:
    grouped = nn.Conv2d(4 * threads.SMALL_SIDE, 4 * threads.SMALL_SIDE, 1, groups=4)
    with ThreadCounts() as mode:
        layer_spectral_bound(grouped)
    assert mode.seen == {1}
