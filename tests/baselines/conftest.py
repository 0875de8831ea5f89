import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Tiny models on a shared 2-core box: one intra-op thread is ~20x faster than two."""
