"""Shared fixtures: small demo data written once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _header_cache_in_a_temporary_folder(tmp_path_factory):
    # The commands' header cache (sftkd_fastmri.data.header_cache) goes to a folder of the
    # test session, not the user's ~/.cache; subprocesses inherit it.
    import os

    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SFTKD_FASTMRI_CACHE_DIR")
    os.environ["SFTKD_FASTMRI_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("SFTKD_FASTMRI_CACHE_DIR", None)
    else:
        os.environ["SFTKD_FASTMRI_CACHE_DIR"] = old


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


@pytest.fixture(scope="session")
def mixed_root(tmp_path_factory):
    """fastMRI-layout splits whose volumes differ in k-space width (24 and 28 columns) and,
    multi-coil, in coil count (4 and 3), as fastMRI's knee and brain volumes do. Per split:
    two volumes of the first shape and one of the second, 3 slices each."""
    import shutil

    from sftkd_fastmri.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("mixed_shapes")
    common = dict(slices_per_volume=3, progress=False, backend="phantom")
    write_demo_data(root, seed=0, image_size=(32, 24), num_coils=4, volumes_per_split=2, **common)
    other = tmp_path_factory.mktemp("mixed_shapes_other")
    write_demo_data(other, seed=1, image_size=(32, 28), num_coils=3, volumes_per_split=1, **common)
    for split in other.iterdir():
        if split.is_dir():
            for volume in split.iterdir():
                shutil.copy(volume, root / split.name / f"wide_{volume.name}")
    return root
