import pytest
import torch

# The tests are many small linear-algebra calls: one intra-op thread avoids thread
# start-up and oversubscription costs that dominate at these sizes on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
