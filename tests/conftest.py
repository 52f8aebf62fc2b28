"""Shared fixtures: small demo data written once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores here; keep torch from oversubscribing them when pytest runs in parallel.
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """fastMRI-layout demo splits (single- and multi-coil) in a temporary folder."""
    from sftkd_fastmri.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo_data")
    write_demo_data(root, seed=0, progress=False)
    return root
