"""torchmetrics certificates: loop references, real 2-process DDP reduction, the tracker."""

from __future__ import annotations

import math
import os
import socket

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.certify import (
    CertificationTracker,
    CertifiedRadius,
    CertifiedRobustAccuracy,
    default_batch_to_input_target,
)
from lightning_spectral.network import network_lipschitz_bound

EPS = [0.0, 0.05, 0.2, 1.0]


def _reference(logits: torch.Tensor, target: torch.Tensor, lip: float, eps: list[float],
               pairwise: list[list[float]] | None = None):
    """Per-eps certified accuracy and mean clamped radius by plain Python loops (the larger of
    the global and, given ``pairwise`` margin bounds, the all-class pairwise radius)."""
    radii = []
    for z, y in zip(logits.double().tolist(), target.tolist(), strict=True):
        other = max(v for j, v in enumerate(z) if j != y)
        radius = (z[y] - other) / (math.sqrt(2) * lip)
        if pairwise is not None:
            radius = max(radius, min((z[y] - z[j]) / pairwise[y][j]
                                     for j in range(len(z)) if j != y))
        radii.append(radius)
    correct = (logits.argmax(1) == target).tolist()
    acc = [sum(c and r >= e for c, r in zip(correct, radii, strict=True)) / len(radii)
           for e in eps]
    mean = sum(max(r, 0.0) for r in radii) / len(radii)
    return acc, mean, [max(r, 0.0) for r in radii]


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_metrics_match_loop_reference_over_batches() -> None:
    logits, target = _data(300, 0)
    acc_metric, rad_metric = CertifiedRobustAccuracy(EPS), CertifiedRadius()
    for chunk in range(0, 300, 64):
        sl = slice(chunk, chunk + 64)
        acc_metric.update(logits[sl], target[sl], 1.5)
        rad_metric.update(logits[sl], target[sl], torch.tensor(1.5, dtype=torch.float64))
    acc, mean, radii = _reference(logits, target, 1.5, EPS)
    torch.testing.assert_close(acc_metric.compute(), torch.tensor(acc))
    torch.testing.assert_close(rad_metric.compute(), torch.tensor(mean, dtype=torch.float64))
    torch.testing.assert_close(rad_metric.radii(), torch.tensor(radii, dtype=torch.float64))
    # eps = 0 is the clean accuracy; more robustness asked, fewer certified.
    clean = (logits.argmax(1) == target).float().mean()
    torch.testing.assert_close(acc_metric.compute()[0], clean)
    assert (acc_metric.compute().diff() <= 0).all()
    acc_metric.reset()
    rad_metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert acc_metric.compute().eq(0).all()
    assert rad_metric.radii().numel() == 0


def test_metric_attributes_and_plots() -> None:
    import matplotlib

    matplotlib.use("Agg")
    for metric in (CertifiedRobustAccuracy([0.1, 0.3]), CertifiedRadius()):
        assert metric.higher_is_better is True and metric.full_state_update is False
        metric.update(*_data(20, 1), 0.5)
        fig, ax = metric.plot()
        assert fig is not None and ax is not None
    with pytest.raises(ValueError, match="epsilons"):
        CertifiedRobustAccuracy([])
    with pytest.raises(ValueError, match="epsilons"):
        CertifiedRobustAccuracy([-0.1])


@pytest.mark.parametrize("eps", ["0.1", [True], [0.1, float("nan")], [float("inf")], 0.1j])
def test_bad_epsilons_are_refused_by_name(eps) -> None:
    with pytest.raises(ValueError, match="epsilons must be"):
        CertifiedRobustAccuracy(eps)


def test_epsilons_from_numbers_numpy_and_tensors() -> None:
    import numpy as np

    assert CertifiedRobustAccuracy(0.5).epsilons == [0.5]
    for eps in ([0, np.float32(0.25), np.int64(1)], torch.tensor([0.0, 0.25, 1.0])):
        assert CertifiedRobustAccuracy(eps).epsilons == [0.0, 0.25, 1.0]


def test_refined_certificate_through_the_metric() -> None:
    logits, target = _data(50, 2)
    weight = torch.randn(5, 7)
    metric = CertifiedRobustAccuracy([0.0, 0.1])
    metric.update(logits, target, None, last_layer_weight=weight, feature_lipschitz=0.3)
    assert 0.0 <= float(metric.compute()[1]) <= float(metric.compute()[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        logits, target = _data(101, 3)
        # Uneven shards: rank 0 gets 60 samples, rank 1 gets 41.
        sl = slice(0, 60) if rank == 0 else slice(60, 101)
        acc, rad = CertifiedRobustAccuracy(EPS), CertifiedRadius()
        acc.update(logits[sl], target[sl], 0.8)
        rad.update(logits[sl], target[sl], 0.8)
        result = {"acc": acc.compute(), "radius": rad.compute(), "radii": rad.radii()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metric_states_reduce_across_two_ddp_processes(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, target = _data(101, 3)
    acc, mean, radii = _reference(logits, target, 0.8, EPS)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["acc"], torch.tensor(acc))
        torch.testing.assert_close(result["radius"], torch.tensor(mean, dtype=torch.float64))
        # Gathered in rank order: every sample's radius exactly once.
        torch.testing.assert_close(result["radii"], torch.tensor(radii, dtype=torch.float64))


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                   nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def validation_step(self, batch, batch_idx) -> None:
        pass


class _Harness(pl.Callback):
    """Drives the tracker from the validation hooks, as SpectralBoundRegularizer does."""

    def __init__(self, tracker: CertificationTracker) -> None:
        self.tracker = tracker

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.tracker.start("validate")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        self.tracker.update("validate", pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.tracker.log("validate", pl_module)


@pytest.mark.parametrize("input_scale", [1.0, [0.5, 0.25]])
def test_tracker_logs_certified_accuracy_in_a_real_trainer(input_scale) -> None:
    x = torch.randn(70, 1, 4, 4) * 0.1
    module = _Classifier()
    with torch.no_grad():
        y = module(x).argmax(1)  # mostly correct, so radii are positive
    y[:5] = (y[:5] + 1) % 3
    eps = [0.0, 0.005, 0.05]
    tracker = CertificationTracker(eps, input_scale=input_scale,
                                   lipschitz_fn=network_lipschitz_bound)  # global radius only
    trainer = pl.Trainer(callbacks=[_Harness(tracker)], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=32))
    logged = trainer.callback_metrics
    lip = float(network_lipschitz_bound(module, (1, 4, 4)))
    scale = 1.0 if input_scale == 1.0 else 0.25  # the smallest per-channel std
    with torch.no_grad():
        acc, mean, _ = _reference(module(x), y, lip / scale, eps)
    assert abs(float(logged["lipschitz/network"]) - lip / scale) < 1e-4 * lip / scale
    for e, a in zip(eps, acc, strict=True):
        assert abs(float(logged[f"certified/acc@{e:g}"]) - a) < 1e-6
    assert abs(float(logged["certified/radius"]) - mean) < 1e-6
    assert acc[0] == pytest.approx(65 / 70) and acc[1] > 0


def test_tracker_rejects_untraceable_modules_with_a_clear_error() -> None:
    class Untraceable(_Classifier):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.model(x)
            return -self.model(x)

    tracker = CertificationTracker([0.1])
    with pytest.raises(TypeError, match="Untraceable.forward"):
        tracker.update("validate", Untraceable(), (torch.randn(2, 1, 4, 4),
                                                   torch.zeros(2, dtype=torch.long)))


def test_batch_layouts_and_arguments() -> None:
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert default_batch_to_input_target((x, y, "extra"))[0] is x
    assert default_batch_to_input_target({"image": x, "label": y})[1] is y
    with pytest.raises(TypeError, match="batch_to_input_target"):
        default_batch_to_input_target(x)
    with pytest.raises(ValueError, match="input_scale"):
        CertificationTracker([0.1], input_scale=0.0)
    with pytest.raises(ValueError, match="epsilons"):
        CertificationTracker([])


def test_spectral_bound_regularizer_logs_the_certificates() -> None:
    """The real callback drives the tracker through a fit: names and values arrive."""
    from lightning_spectral import SpectralBoundRegularizer

    class Trainable(_Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    module = Trainable()
    callback = SpectralBoundRegularizer(constraint=1.0, certify_epsilons=[0.0, 0.01])
    trainer = pl.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, max_epochs=1,
                         num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(module, loader, loader)
    logged = trainer.callback_metrics
    lip = float(network_lipschitz_bound(module, (1, 4, 4)))
    assert abs(float(logged["lipschitz/network"]) - lip) < 1e-4 * lip
    # The head's margins: ||W_y - W_j|| times the bound of the features before it.
    features = float(network_lipschitz_bound(module.model[:-1], (1, 4, 4)))
    w = module.model[-1].weight.detach().double()
    pairwise = [[min(math.sqrt(2) * lip, float((w[i] - w[j]).norm()) * features)
                 for j in range(3)] for i in range(3)]
    with torch.no_grad():
        acc, mean, _ = _reference(module(x), y, lip, [0.0, 0.01], pairwise)
    assert abs(float(logged["certified/acc@0"]) - acc[0]) < 1e-6
    assert abs(float(logged["certified/acc@0.01"]) - acc[1]) < 1e-6
    assert abs(float(logged["certified/radius"]) - mean) < 1e-6


@pytest.mark.parametrize("metric", [CertifiedRobustAccuracy([0.1]), CertifiedRadius()])
def test_metrics_refuse_non_finite_logits_and_constants(metric) -> None:
    logits, target = _data(6, 4)
    bad = logits.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="logits.*not finite"):
        metric.update(bad, target, 1.0)
    with pytest.raises(ValueError, match="lipschitz_constant.*finite"):
        metric.update(logits, target, float("nan"))
    with pytest.raises(ValueError, match="lipschitz_constant.*>= 0"):
        metric.update(logits, target, -2.0)


def test_precomputed_radii_feed_both_metrics() -> None:
    from lightning_spectral.functional import certified_radius

    logits, target = _data(90, 5)
    radius = certified_radius(logits, target, 0.9)
    shared = (CertifiedRobustAccuracy(EPS), CertifiedRadius())
    alone = (CertifiedRobustAccuracy(EPS), CertifiedRadius())
    for a, b in zip(shared, alone, strict=True):
        a.update(logits, target, radius=radius)
        b.update(logits, target, 0.9)
        torch.testing.assert_close(a.compute(), b.compute())
    with pytest.raises(ValueError, match="either"):
        shared[0].update(logits, target, 0.9, radius=radius)
    with pytest.raises(ValueError, match=r"radius must have shape \(90,\)"):
        shared[1].update(logits, target, radius=radius[:5])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        shared[0].update(logits, target + 5, radius=radius)
    with pytest.raises(ValueError, match="radius.*NaN"):
        shared[0].update(logits, target, radius=torch.full((90,), float("nan")))


def test_tracker_names_a_non_finite_network_bound() -> None:
    module = _Classifier()
    tracker = CertificationTracker([0.1], lipschitz_fn=lambda m, s: torch.tensor(float("nan")))
    batch = (torch.randn(3, 1, 4, 4), torch.zeros(3, dtype=torch.long))
    tracker.start("validate")
    with pytest.raises(ValueError, match=r"network Lipschitz bound .*\(1, 4, 4\).*nan"):
        tracker.update("validate", module, batch)


@pytest.mark.parametrize("scale", [True, "0.5", [[0.5, 0.2]], float("nan"), -1.0, []])
def test_tracker_refuses_bad_input_scales(scale) -> None:
    with pytest.raises(ValueError, match="input_scale"):
        CertificationTracker([0.1], input_scale=scale)


def test_tracker_input_scale_takes_the_smallest_std() -> None:
    import numpy as np

    for scale in (np.float32(0.25), [0.5, np.float64(0.25)], torch.tensor([0.5, 0.25, 1.0])):
        assert CertificationTracker([0.1], input_scale=scale).input_scale == 0.25


@pytest.mark.parametrize("scale", [0.25, [0.5, 0.25], (0.25, 1.0), torch.tensor([0.5, 0.25])])
def test_callback_takes_the_input_scales_the_tracker_takes(scale) -> None:
    from lightning_spectral import SpectralBoundRegularizer

    callback = SpectralBoundRegularizer(certify_epsilons=[0.1], input_scale=scale)
    assert callback.input_scale == CertificationTracker([0.1], input_scale=scale).input_scale
    assert callback.input_scale == 0.25


@pytest.mark.parametrize("scale", [True, "0.5", [[0.5, 0.2]], float("nan"), -1.0, [], 0.0])
def test_callback_refuses_the_input_scales_the_tracker_refuses(scale) -> None:
    from lightning_spectral import SpectralBoundRegularizer

    with pytest.raises(ValueError, match="input_scale"):
        SpectralBoundRegularizer(certify_epsilons=[0.1], input_scale=scale)
