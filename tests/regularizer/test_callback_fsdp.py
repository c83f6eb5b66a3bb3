"""FSDP2 (``fully_shard`` under ModelParallelStrategy) with 2 CPU processes: the logged values,
the callback's state and the trained (gathered) weights equal one process on the same global
batch, with the penalty and with the constraint. The penalty is computed from the whole weights,
never from a shard; FSDP1 is refused."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers.callback import Module, loader, quiet_trainer, tiny_net
from lightning.pytorch.loggers import CSVLogger

from lightning_spectral.callback import SpectralBoundRegularizer

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "helpers"
COMPARED = ("spectral_", "lipschitz/", "certified/")


def _run_sharded(
    out: Path, beta: float, constraint: float | None, *extra: str
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parents[1]), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "callback_fsdp_script.py"), str(out), str(beta),
         "none" if constraint is None else str(constraint), *extra],
        env=env, cwd=out, capture_output=True, text=True, timeout=300,
    )
    if not extra:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _logged(path: Path) -> dict[tuple[str, str], float]:
    """``(step, key) -> value`` of the compared keys in a CSVLogger's metrics.csv."""
    values = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith(COMPARED) and value != "":
                    values[(row["step"], key)] = float(value)
    return values


def _run_single(out: Path, beta: float, constraint: float | None):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = tiny_net()
        reg = SpectralBoundRegularizer(
            beta=beta, constraint=constraint, n_power_iterations=2, warmup_power_iterations=20,
            certify_epsilons=[0.1],
        )
        trainer = quiet_trainer(
            max_steps=3, callbacks=[reg], logger=CSVLogger(out, name="single", version=0),
            log_every_n_steps=1, limit_val_batches=1, val_check_interval=3,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Module(net), loader(16), loader(16))
    finally:
        torch.set_num_threads(n)
    return net, reg


@pytest.mark.parametrize(("beta", "constraint"), [(0.5, None), (0.2, 1.0)])
def test_fsdp2_two_processes_match_single_process(tmp_path, beta, constraint):
    _run_sharded(tmp_path, beta, constraint)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # net.0's and net.4's weights and biases are sharded at the end (net.2 and the root's head
    # stay gathered after the last forward): the test would mean little otherwise.
    assert [r0["sharded"][i] for i in (0, 1, 4, 5)] == [True] * 4

    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    for name, entry in r0["reg"]["layers"].items():  # the vectors stay replicated
        theirs = r1["reg"]["layers"][name]
        for a, b in zip(entry["u"] + entry["v"], theirs["u"] + theirs["v"], strict=True):
            assert torch.equal(a, b)
    assert r0["bounds"] == r1["bounds"]

    net, reg = _run_single(tmp_path, beta, constraint)
    for p, q in zip(net.parameters(), r0["params"], strict=True):
        torch.testing.assert_close(p.detach(), q, atol=2e-6, rtol=2e-6)
    for name, entry in reg.state_dict()["layers"].items():
        mine = r0["reg"]["layers"][name]
        for a, b in zip(entry["u"] + entry["v"], mine["u"] + mine["v"], strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    single = reg.guaranteed_bounds()
    assert r0["bounds"].keys() == single.keys()
    for name, value in single.items():
        assert r0["bounds"][name] == pytest.approx(value, rel=1e-5)
    if constraint is not None:
        assert max(r0["bounds"].values()) <= constraint

    sharded = _logged(tmp_path / "fsdp" / "version_0" / "metrics.csv")
    expected = _logged(tmp_path / "single" / "version_0" / "metrics.csv")
    assert sharded.keys() == expected.keys()
    assert any(k == "spectral_penalty" for _, k in expected)
    assert any(k.startswith("certified/acc") for _, k in expected)
    for key, value in expected.items():
        assert sharded[key] == pytest.approx(value, rel=2e-5, abs=1e-6), key


def test_fsdp2_non_finite_shard_on_one_rank_stops_every_rank(tmp_path):
    # Only rank 1's shard of net.2 turns NaN: the per-layer sums are all-reduced, so both ranks
    # name the layer and stop together (a rank-local check would leave rank 0 waiting).
    proc = _run_sharded(tmp_path, 0.5, None, "nan")
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (
            f"[rank{rank}]: RuntimeError: SpectralBoundRegularizer: non-finite weights (NaN or "
            "Inf) in layer(s) net.2 (after the optimizer step"
        ) in proc.stderr, proc.stderr[-4000:]
    assert not (tmp_path / "rank0.pt").exists()


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="FSDP1 needs an accelerator: torch's FullyShardedDataParallel and Lightning's "
    "strategy='fsdp' both refuse CPU",
)
def test_fsdp1_strategy_is_refused():
    reg = SpectralBoundRegularizer(beta=0.5)
    trainer = quiet_trainer(max_steps=1, callbacks=[reg], accelerator="gpu", strategy="fsdp")
    with pytest.raises(RuntimeError, match="does not support FSDP1"):
        trainer.fit(Module(tiny_net()), loader(16))
