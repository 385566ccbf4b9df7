"""The DC tests run many small-tensor ops: one intra-op thread avoids OpenMP spin-waits on a busy machine."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
