"""Shared test configuration: one intra-op thread, a fixed seed, one hypothesis profile.

Tests live in folders mirroring the package (``functional/``, ``network/``, ``certify/``,
``regularizer/``, ``demos/``, ``report/``, ``docs/``); shared oracles and helpers are the
``helpers`` package beside them.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tests are many small linear-algebra calls: one intra-op thread avoids thread
# start-up and oversubscription costs that dominate at these sizes on a 2-core machine.
torch.set_num_threads(1)

# Every property test runs the same examples on every machine (derandomize), with no
# deadline (first calls compile kernels and allocate; a slow CI machine is not a failure).
# A test states only how many examples it needs. HYPOTHESIS_PROFILE=random draws new
# examples on every run, for a wider search than the fixed ones.
settings.register_profile(
    "default", deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "random", deadline=None, derandomize=False, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
