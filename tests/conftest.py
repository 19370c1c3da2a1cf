"""Shared fixtures: CPU only, one thread, a private data cache per test session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and CI has 2 shared cores


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Render the embedded data set into a temp dir, never into the user's ~/.cache."""
    os.environ["DISTILL_CACHE"] = str(tmp_path_factory.mktemp("distill-cache"))
    yield
