import os

import pytest
import torch

# Two cores are shared by torch's intra-op pool and the test processes; more threads only thrash.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
