"""Certification through the real callback and Trainer: fit, validate and test, logged to CSV.

Every expected value is recomputed here from the model's logits and an independently
computed network bound, by plain Python loops.
"""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.certify import PoolNet, random_images
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import SpectralBoundRegularizer
from lightning_spectral.certify import CertificationTracker, CertifiedRobustAccuracy
from lightning_spectral.network import network_lipschitz_bound


def _reference(logits: torch.Tensor, target: torch.Tensor, lip: float, eps: list[float],
               pairwise: list[list[float]] | None = None):
    """Certified accuracy per eps and the mean clamped radius, by loops over samples: the
    larger of the global radius and, with ``pairwise`` bounds, the all-class pairwise one."""
    radii, correct = [], []
    for z, y in zip(logits.double().tolist(), target.tolist(), strict=True):
        other = max(v for j, v in enumerate(z) if j != y)
        radius = (z[y] - other) / (math.sqrt(2) * lip)
        if pairwise is not None:
            radius = max(radius, min((z[y] - z[j]) / pairwise[y][j]
                                     for j in range(len(z)) if j != y))
        radii.append(radius)
        correct.append(max(range(len(z)), key=lambda j: (z[j], -j)) == y)
    acc = [sum(c and r >= e for c, r in zip(correct, radii, strict=True)) / len(radii)
           for e in eps]
    return acc, sum(max(r, 0.0) for r in radii) / len(radii)


def _trainer(tmp_path: Path, callback: pl.Callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(callbacks=[callback], logger=CSVLogger(tmp_path, name="run"),
                      enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                      devices=1, **kwargs)


def _logged(trainer: pl.Trainer) -> list[dict[str, float]]:
    """Rows of metrics.csv, empty cells dropped."""
    trainer.logger.save()
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _last(rows: list[dict[str, float]], key: str) -> float:
    values = [row[key] for row in rows if key in row]
    assert values, f"{key} was never logged; logged: {sorted({k for r in rows for k in r})}"
    return values[-1]


def _bounds(module: PoolNet, shape: tuple[int, ...]) -> tuple[float, list[list[float]]]:
    """``L`` and the head's pairwise margin bounds ``||W_y - W_j||`` times the bound of the
    features (the network minus its head), by loops."""
    lip = float(network_lipschitz_bound(module, shape))
    features = float(network_lipschitz_bound(module.model[:-1], shape))
    w = module.model[-1].weight.detach().double()
    pairwise = [[min(math.sqrt(2) * lip, float((w[i] - w[j]).norm()) * features)
                 for j in range(w.shape[0])] for i in range(w.shape[0])]
    return lip, pairwise


def _expected(module: PoolNet, data: TensorDataset, eps: list[float]):
    x, y = data.tensors
    lip, pairwise = _bounds(module, tuple(x.shape[1:]))
    with torch.no_grad():
        acc, mean = _reference(module(x), y, lip, eps, pairwise)
    return lip, acc, mean


def _assert_logged(rows, prefix: str, expected, eps: list[float]) -> None:
    lip, acc, mean = expected
    assert _last(rows, f"{prefix}lipschitz/network") == pytest.approx(lip, rel=1e-6)
    for e, a in zip(eps, acc, strict=True):
        assert _last(rows, f"{prefix}certified/acc@{e:g}") == pytest.approx(a, abs=1e-6)
    assert _last(rows, f"{prefix}certified/radius") == pytest.approx(mean, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("eps", [[0.1], [0.0, 0.01, 0.1]])
def test_accuracy_has_one_value_per_epsilon(eps: list[float]) -> None:
    metric = CertifiedRobustAccuracy(eps)
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    metric.update(logits, target, 1.0)
    value = metric.compute()
    assert value.shape == (len(eps),)
    assert value[0] == pytest.approx(0.5)
    # forward() returns the batch's value through the same compute; a pickled copy keeps it.
    assert metric(logits, target, 1.0).shape == (len(eps),)
    assert pickle.loads(pickle.dumps(metric)).compute().shape == (len(eps),)


@pytest.mark.parametrize("eps", [[0.01], [0.0, 0.01, 0.05]])
def test_fit_logs_certificates_for_one_or_several_radii(tmp_path: Path, eps) -> None:
    module, val = PoolNet(), random_images(30, 6, 1)
    trainer = _trainer(tmp_path, SpectralBoundRegularizer(certify_epsilons=eps), max_epochs=2)
    trainer.fit(module, DataLoader(random_images(30, 6, 0), batch_size=10),
                DataLoader(val, batch_size=16))
    rows = _logged(trainer)
    _assert_logged(rows, "", _expected(module, val, eps), eps)
    assert sum(f"certified/acc@{eps[0]:g}" in row for row in rows) == 2  # once per epoch


def test_bound_is_computed_for_each_input_shape(tmp_path: Path) -> None:
    """Batches of 16x16 and 4x4 images: each is certified with the bound at its own size."""
    module, eps = PoolNet(), [0.0, 0.02, 0.05, 0.1]
    big, small = random_images(40, 16, 2), random_images(40, 4, 3)
    lip_big, k_big = _bounds(module, (1, 16, 16))
    lip_small, k_small = _bounds(module, (1, 4, 4))
    assert lip_small > 2 * lip_big  # a global average over 16 vs 256 positions
    batches = [big.tensors, small.tensors, big.tensors]
    trainer = _trainer(tmp_path, SpectralBoundRegularizer(certify_epsilons=eps))
    trainer.validate(module, DataLoader(batches, batch_size=None))
    with torch.no_grad():
        logits = torch.cat([module(x) for x, _ in batches])
    target = torch.cat([y for _, y in batches])
    bounds = [(lip_big, k_big)] * 40 + [(lip_small, k_small)] * 40 + [(lip_big, k_big)] * 40
    radii = [_reference(logits[i:i + 1], target[i:i + 1], bounds[i][0], eps, bounds[i][1])
             for i in range(120)]
    acc = [sum(r[0][k] for r in radii) / 120 for k in range(len(eps))]
    rows = _logged(trainer)
    for e, a in zip(eps, acc, strict=True):
        assert _last(rows, f"certified/acc@{e:g}") == pytest.approx(a, abs=1e-6)
    assert _last(rows, "certified/radius") == pytest.approx(
        sum(r[1] for r in radii) / 120, rel=1e-5)
    # The largest bound over the shapes seen is the one logged.
    assert _last(rows, "lipschitz/network") == pytest.approx(lip_small, rel=1e-6)


def test_test_after_fit_logs_test_certificates_apart_from_validation(tmp_path: Path) -> None:
    eps = [0.0, 0.01]
    module, val, test = PoolNet(), random_images(30, 6, 1), random_images(24, 5, 4)
    trainer = _trainer(tmp_path, SpectralBoundRegularizer(certify_epsilons=eps), max_epochs=1)
    trainer.fit(module, DataLoader(random_images(30, 6, 0), batch_size=10),
                DataLoader(val, batch_size=16))
    trainer.test(module, DataLoader(test, batch_size=10))
    rows = _logged(trainer)
    _assert_logged(rows, "", _expected(module, val, eps), eps)
    _assert_logged(rows, "test/", _expected(module, test, eps), eps)
    # validate still works after test, and uses the validation data alone.
    trainer.validate(module, DataLoader(val, batch_size=7))
    assert float(trainer.callback_metrics["certified/acc@0.01"]) == pytest.approx(
        _expected(module, val, eps)[1][1], abs=1e-6)


def test_test_on_a_fresh_trainer_without_fit(tmp_path: Path) -> None:
    eps = [0.02]
    module, test = PoolNet(), random_images(33, 8, 5)
    trainer = _trainer(tmp_path, SpectralBoundRegularizer(certify_epsilons=eps))
    trainer.test(module, DataLoader(test, batch_size=10))
    rows = _logged(trainer)
    _assert_logged(rows, "test/", _expected(module, test, eps), eps)
    assert not any("certified/acc@0.02" in row for row in rows)  # no validation value


def test_tracker_keeps_validation_and_test_states_apart() -> None:
    """A test run in the middle of a validation run's accumulation must not leak into it."""
    module, eps = PoolNet(), [0.0]
    tracker = CertificationTracker(eps)
    val, test = random_images(10, 6, 6), random_images(10, 6, 7)
    tracker.start("validate")
    tracker.update("validate", module, val.tensors)
    tracker.start("test")
    tracker.update("test", module, test.tensors)
    for stage, data in (("validate", val), ("test", test)):
        x, y = data.tensors
        with torch.no_grad():
            clean = float((module(x).argmax(1) == y).float().mean())
        values = tracker.compute(stage)
        prefix = "test/" if stage == "test" else ""
        assert float(values[f"{prefix}certified/acc@0"]) == pytest.approx(clean)


class _BatchNormNet(PoolNet):
    """BatchNorm uses batch statistics in train mode: the logits then differ from eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                   nn.Linear(8, 3))

    def on_validation_model_eval(self) -> None:
        pass  # the user keeps train mode during validation (e.g. for MC dropout)


def test_certificates_are_for_the_eval_mode_network(tmp_path: Path) -> None:
    """The bound holds for the network in eval mode; logits from train mode are another map."""
    module, val, eps = _BatchNormNet(), random_images(40, 6, 8), [0.0, 0.01]
    bn = module.model[2]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    trainer = _trainer(tmp_path, SpectralBoundRegularizer(certify_epsilons=eps))
    trainer.validate(module, DataLoader(val, batch_size=20))
    assert module.training  # the user's choice is left as it was
    torch.testing.assert_close((bn.running_mean, bn.running_var), stats)  # nothing updated
    module.eval()
    _assert_logged(_logged(trainer), "", _expected(module, val, eps), eps)


def test_half_precision_logits_are_certified_with_a_warning() -> None:
    """A float16 network's rounding (~1e-3 relative) is not covered by the certificate."""
    module = PoolNet().half()
    tracker = CertificationTracker([0.0])
    x, y = random_images(8, 6, 9).tensors
    tracker.start("test")
    with pytest.warns(UserWarning, match="float16.*rounding"):
        tracker.update("test", module, (x.half(), y))
    with torch.no_grad():
        clean = float((module(x.half()).argmax(1) == y).float().mean())
    assert float(tracker.compute("test")["test/certified/acc@0"]) == pytest.approx(clean)


def _deepfool_distance(model: nn.Module, x: torch.Tensor, steps: int = 30) -> torch.Tensor:
    """l2 length of a perturbation that changes each prediction (DeepFool with overshoot, in
    float64; converts ``model``): an upper bound on the distance to the decision boundary."""
    model = model.double().eval()
    x0 = x.double()
    label = model(x0).argmax(1)
    delta = torch.zeros_like(x0)
    found = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    for _ in range(steps):
        xa = (x0 + delta).requires_grad_(True)
        z = model(xa)
        flipped = z.argmax(1) != label
        norms = delta.flatten(1).norm(dim=1)
        found = torch.where(flipped, torch.minimum(found, norms), found)
        other = z.scatter(1, label[:, None], -math.inf).argmax(1)
        gap = (z.gather(1, label[:, None]) - z.gather(1, other[:, None])).squeeze(1)
        (grad,) = torch.autograd.grad(gap.sum(), xa)
        g2 = grad.flatten(1).pow(2).sum(1).clamp_min(1e-30)
        # The linearized boundary is gap / ||grad|| away along -grad; overshoot it slightly.
        step = (gap.clamp_min(0) / g2 * 1.02 + 1e-6)[:, None, None, None] * grad
        still = (~flipped).double()[:, None, None, None]  # flipped points stay where they are
        delta = delta - still * step
    return found


def test_certified_radii_withstand_an_attack_at_each_input_size() -> None:
    """The certified radius of every sample is below the boundary distance an attack finds."""
    torch.manual_seed(3)
    module = PoolNet()
    with torch.no_grad():
        module.model[0].weight.abs_()  # the features follow the input's mean: large margins
    big, small = random_images(40, 16, 2).tensors[0], random_images(200, 4, 3).tensors[0]
    with torch.no_grad():  # labels the network gets right: every radius is positive
        big, small = (big, module(big).argmax(1)), (small, module(small).argmax(1))
    tracker = CertificationTracker([0.0])
    tracker.start("validate")
    tracker.update("validate", module, big)
    tracker.update("validate", module, small)
    radii = tracker.runs["validate"].radius.radii()[40:]
    distance = _deepfool_distance(module, small[0])
    assert torch.isfinite(distance).all() and (radii > 0).all()
    assert (radii <= distance).all(), int((radii > distance).sum())


def test_logged_network_bound_is_rounded_up(tmp_path: Path) -> None:
    """The bound is float64; the logged float32 value must not fall below it."""
    true_bound = 1.0 + 2.0**-30  # float32 rounds it to nearest: down to 1.0
    tracker = CertificationTracker(
        [0.0], lipschitz_fn=lambda module, shape: torch.tensor(true_bound, dtype=torch.float64))

    class Harness(pl.Callback):
        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            tracker.start("validate")

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                    dataloader_idx=0) -> None:
            tracker.update("validate", pl_module, batch)

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            tracker.log("validate", pl_module)

    trainer = _trainer(tmp_path, Harness())
    trainer.validate(PoolNet(), DataLoader(random_images(8, 6, 10), batch_size=8))
    assert float(trainer.callback_metrics["lipschitz/network"]) >= true_bound
    assert _last(_logged(trainer), "lipschitz/network") >= true_bound


def test_several_validation_dataloaders_are_pooled(tmp_path: Path) -> None:
    class TwoLoaders(PoolNet):
        def validation_step(self, batch, batch_idx, dataloader_idx=0) -> None:
            pass

    module, eps = TwoLoaders(), [0.0, 0.01]
    first, second = random_images(10, 6, 11), random_images(14, 6, 12)
    trainer = _trainer(tmp_path, SpectralBoundRegularizer(certify_epsilons=eps))
    trainer.validate(module, [DataLoader(first, batch_size=5), DataLoader(second, batch_size=5)])
    pooled = TensorDataset(*(torch.cat(t) for t in zip(first.tensors, second.tensors,
                                                         strict=True)))
    _assert_logged(_logged(trainer), "", _expected(module, pooled, eps), eps)


def test_two_ddp_processes_with_different_input_sizes(tmp_path: Path) -> None:
    """Metrics pool both ranks; the logged network bound is the max over every rank's shapes."""
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(here.parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    script = here.parent / "helpers" / "certification_ddp_script.py"
    proc = subprocess.run([sys.executable, str(script),
                           str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from helpers.certification_ddp_script import SIZES, rank_loader

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    module = PoolNet()
    module.load_state_dict(results[0]["state"])
    bounds = [_bounds(module, (1, s, s)) for s in SIZES]
    lips = [lip for lip, _ in bounds]
    accs, radii = [], []
    for rank in range(2):
        x, y = rank_loader(rank).dataset.tensors
        with torch.no_grad():
            acc, mean = _reference(module(x), y, lips[rank], [0.0, 0.05], bounds[rank][1])
        accs.append(acc)
        radii.append(mean)
    for result in results:
        for prefix in ("", "test/"):
            logged = result["logged"]
            assert float(logged[f"{prefix}lipschitz/network"]) >= max(lips)
            assert float(logged[f"{prefix}lipschitz/network"]) == pytest.approx(max(lips))
            for k, e in enumerate(("0", "0.05")):
                assert float(logged[f"{prefix}certified/acc@{e}"]) == pytest.approx(
                    (accs[0][k] + accs[1][k]) / 2, abs=1e-6)
            assert float(logged[f"{prefix}certified/radius"]) == pytest.approx(
                sum(radii) / 2, rel=1e-5)


class _Mlp(PoolNet):
    """``return self.model(x)`` with a plain ReLU MLP: a chain the compositional bound takes."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32),
                                   nn.ReLU(), nn.Linear(32, 3))


def _validated(module: nn.Module, batch, compositional: bool):
    tracker = CertificationTracker([0.0], compositional=compositional)
    tracker.start("validate")
    tracker.update("validate", module, batch)
    run = tracker.runs["validate"]
    return run.radius.radii(), float(next(iter(run.lipschitz.values())))


def test_compositional_bound_enlarges_certified_radii_and_they_withstand_an_attack() -> None:
    torch.manual_seed(0)
    module = _Mlp()
    x = random_images(200, 4, 5).tensors[0]
    with torch.no_grad():  # labels the network gets right: every radius is positive
        batch = (x, module(x).argmax(1))
    plain, lip_plain = _validated(module, batch, compositional=False)
    chain, lip_chain = _validated(module, batch, compositional=True)
    assert lip_plain == pytest.approx(float(network_lipschitz_bound(module, (1, 4, 4))))
    assert lip_chain < 0.9 * lip_plain
    assert (chain >= plain).all() and (chain > plain).any()
    distance = _deepfool_distance(module, x)
    assert torch.isfinite(distance).all() and (chain > 0).all()
    assert (chain <= distance).all(), int((chain > distance).sum())


def test_compositional_leaves_a_forward_that_is_no_chain_alone() -> None:
    module = PoolNet()  # global average pooling: not a layer the chain bound takes
    batch = (random_images(8, 6, 1).tensors[0], torch.zeros(8, dtype=torch.long))
    assert _validated(module, batch, True)[1] == _validated(module, batch, False)[1]


def _callback_validated(module: nn.Module, x: Tensor, y: Tensor, compositional: bool) -> dict:
    reg = SpectralBoundRegularizer(certify_epsilons=[0.0], log_per_layer=False,
                                   certify_compositional=compositional)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[reg],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (out,) = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=50),
                              verbose=False)
    return out


def test_the_callback_certifies_with_the_chain_bound_when_asked() -> None:
    torch.manual_seed(0)
    module = _Mlp()
    x = random_images(100, 4, 5).tensors[0]
    with torch.no_grad():
        y = module(x).argmax(1)
    plain = _callback_validated(module, x, y, compositional=False)
    chain = _callback_validated(module, x, y, compositional=True)
    assert float(chain["lipschitz/network"]) < 0.9 * float(plain["lipschitz/network"])
    assert float(chain["certified/radius"]) > float(plain["certified/radius"])
    with pytest.raises(ValueError, match="certify_compositional"):
        SpectralBoundRegularizer(certify_epsilons=[0.1], certify_compositional="yes")
