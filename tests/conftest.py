"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: the small per-pulse ops of whole jobs on a virtual
    chip or a station (client and served chip in this process) stall badly when torch's
    thread pool competes for two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
