"""DDP with 2 CPU processes: identical weights on both ranks, equal to one process on the same
global batch (the penalty is computed identically on every rank, so gradient averaging keeps it)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from helpers.callback import Module, loader, quiet_trainer, tiny_net

from lightning_spectral.callback import SpectralBoundRegularizer

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "helpers"


def test_ddp_two_processes_match_single_process(tmp_path):
    env = dict(os.environ)
    root = str(HERE.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "callback_ddp_script.py"), str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    for name, entry in r0["reg"]["layers"].items():
        for a, b in zip(entry["u"] + entry["v"],
                        r1["reg"]["layers"][name]["u"] + r1["reg"]["layers"][name]["v"],
                        strict=True):
            assert torch.equal(a, b)

    # One process, batch 16 = the union of the two ranks' batches of 8 (DistributedSampler
    # without shuffling deals indices round-robin; the mean loss is the same).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = tiny_net()
        reg = SpectralBoundRegularizer(beta=0.5, n_power_iterations=2, warmup_power_iterations=20)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(max_steps=3, callbacks=[reg]).fit(Module(net), loader(16))
    finally:
        torch.set_num_threads(n)
    for p, q in zip(net.parameters(), r0["params"], strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-5, rtol=1e-5)
