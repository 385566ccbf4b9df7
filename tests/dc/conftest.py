"""The DC tests run many small-tensor ops: one intra-op thread (see ``single_thread`` in tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    yield
