import pytest
import torch

from diffusolve._alloc import keep_freed_memory

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
keep_freed_memory()  # as the command line does: reuse freed large blocks (diffusolve._alloc)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread (restored afterwards).

    For tests made of many tiny tensor operations (exact-law probes, long solves of a few
    thousand 3-d samples), a second thread brings nothing and, on a loaded machine, every
    operation waits for it: measured 10x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
