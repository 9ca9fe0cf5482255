"""Shared fixtures; makes ``tests/`` importable so ``supernets`` and ``helpers`` resolve."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

# The tests run tiny tensors: intra-op threads only add synchronisation (and stall badly
# when another process holds a core), so run single-threaded.
torch.set_num_threads(1)

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items):
    """Hypothesis property tests are ``slow``: ``-m "not slow"`` is the quick subset."""
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
