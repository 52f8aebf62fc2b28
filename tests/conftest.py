"""Shared fixtures: small demo data written once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tiny tensors: one thread is fastest and does not oversubscribe a shared 2-core machine.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """fastMRI-layout demo splits (single- and multi-coil) in a temporary folder."""
    from sftkd_fastmri.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo_data")
    write_demo_data(root, seed=0, progress=False)
    return root
