"""The header cache: a split scanned again opens only the volumes that changed, and reads
back exactly what the scan found."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from sftkd_fastmri.data import CheckedSliceDataset, datasets
from sftkd_fastmri.data.header_cache import HeaderCache, _decode, _encode
from sftkd_fastmri.data.transforms import DataError


@pytest.fixture()
def data(tmp_path_factory):
    from sftkd_fastmri.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("cached")
    write_demo_data(
        root,
        seed=3,
        image_size=(32, 24),
        num_coils=2,
        volumes_per_split={"train": 3, "val": 1, "test": 2},
        slices_per_volume=2,
        progress=False,
    )
    return root


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SFTKD_FASTMRI_CACHE_DIR", str(folder))
    return folder


@pytest.fixture()
def checks(monkeypatch):
    """The volumes the scan opened to check (each opened volume is checked first)."""
    opened = []
    real = datasets.check_volume

    def counting(fname, *args, **kwargs):
        opened.append(fname.name)
        return real(fname, *args, **kwargs)

    monkeypatch.setattr(datasets, "check_volume", counting)
    return opened


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, tuple):
        return type(b) is tuple and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_a_split_scanned_again_opens_no_volume_and_reads_the_same(data, cache_dir, checks):
    from sftkd_fastmri.data.masks import create_mask_func
    from sftkd_fastmri.data.transforms import DCCNNDataTransform

    def transform():  # masks drawn per volume and slice (a validation transform)
        return DCCNNDataTransform(create_mask_func("equispaced", [0.25], [2]), training=False)

    folder = data / "multicoil_train"
    plain = CheckedSliceDataset(folder, "multicoil", transform=transform())
    assert len(checks) == 3 and not cache_dir.exists()  # off by default, as fastMRI's
    checks.clear()
    first = CheckedSliceDataset(folder, "multicoil", header_cache=True)
    assert len(checks) == 3 and len(list((cache_dir / "headers").iterdir())) == 1
    checks.clear()
    again = CheckedSliceDataset(folder, "multicoil", transform=transform(), header_cache=True)
    assert checks == []  # every header came from the cache
    assert len(again.raw_samples) == len(first.raw_samples) == len(plain.raw_samples) == 6
    for cached, read in zip(again.raw_samples, plain.raw_samples):
        assert cached.fname == read.fname and cached.slice_ind == read.slice_ind
        assert cached.metadata.keys() == read.metadata.keys()
        for key in read.metadata:  # equal values of the same types (numpy scalars stay numpy)
            assert _same(cached.metadata[key], read.metadata[key]), key
    for i in range(len(plain)):  # the samples the transform makes are the same
        a, b = plain[i], again[i]
        for name in ("masked_kspace", "target", "mask"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert a.max_value == b.max_value


def test_a_changed_or_damaged_volume_is_read_again(data, cache_dir, checks, tmp_path):
    folder = data / "multicoil_train"
    CheckedSliceDataset(folder, "multicoil", header_cache=True)
    names = sorted(p.name for p in folder.iterdir())
    with h5py.File(folder / names[0], "a") as hf:  # a new attribute: the file changed
        hf.attrs["norm"] = 2.5
    checks.clear()
    ds = CheckedSliceDataset(folder, "multicoil", header_cache=True)
    assert checks == [names[0]]
    assert ds.raw_samples[0].metadata["norm"] == 2.5
    # a volume cut short after it was cached is found and named
    path = folder / names[1]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=names[1]):
        CheckedSliceDataset(folder, "multicoil", header_cache=True)
    path.unlink()
    CheckedSliceDataset(folder, "multicoil", header_cache=True)
    # replaced by a copy of the same size and modification time (copy2): another inode
    shutil.copy2(folder / names[2], tmp_path / "copy.h5")
    os.replace(tmp_path / "copy.h5", folder / names[2])
    # edited in place with its modification time set back (touch -r): another change time
    before = os.stat(folder / names[0])
    with h5py.File(folder / names[0], "a") as hf:
        hf.attrs["norm"] = 3.5
    os.utime(folder / names[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    checks.clear()
    ds = CheckedSliceDataset(folder, "multicoil", header_cache=True)
    assert sorted(checks) == sorted([names[0], names[2]])
    assert ds.raw_samples[0].metadata["norm"] == 3.5


def test_a_volume_that_changes_while_it_is_read_is_read_again_next_time(
    data, cache_dir, monkeypatch
):
    from fastmri.data import SliceDataset

    folder = data / "singlecoil_train"
    victim = sorted(folder.iterdir())[0]
    real = SliceDataset._retrieve_metadata

    def read_then_edit(self, fname):
        found = real(self, fname)
        if fname == victim:  # another process writes the file just after its header was read
            with h5py.File(victim, "a") as hf:
                hf.attrs["max"] = 123.0
        return found

    monkeypatch.setattr(SliceDataset, "_retrieve_metadata", read_then_edit)
    CheckedSliceDataset(folder, "singlecoil", header_cache=True)
    monkeypatch.setattr(SliceDataset, "_retrieve_metadata", real)
    ds = CheckedSliceDataset(folder, "singlecoil", header_cache=True)
    assert ds.raw_samples[0].fname == victim and ds.raw_samples[0].metadata["max"] == 123.0


def test_values_json_cannot_carry_leave_the_volume_uncached(data, cache_dir, checks):
    folder = data / "singlecoil_train"
    odd = sorted(folder.iterdir())[0]
    with h5py.File(odd, "a") as hf:
        hf.attrs["extended"] = np.longdouble(1) / 3  # no exact JSON number
    ds = CheckedSliceDataset(folder, "singlecoil", header_cache=True)
    assert ds.raw_samples[0].metadata["extended"].dtype == np.longdouble
    checks.clear()
    CheckedSliceDataset(folder, "singlecoil", header_cache=True)
    assert checks == [odd.name]  # read each time; the other volumes come from the cache


def test_no_home_folder_means_no_cache_not_a_failed_run(data, monkeypatch):
    from sftkd_fastmri.data import header_cache

    def no_home():
        raise RuntimeError("Could not determine home directory")

    monkeypatch.setattr(header_cache, "cache_dir", no_home)
    with pytest.warns(UserWarning, match="no header cache .*SFTKD_FASTMRI_CACHE_DIR"):
        ds = CheckedSliceDataset(data / "singlecoil_train", "singlecoil", header_cache=True)
    assert len(ds) == 6


def test_a_volume_cached_without_its_target_checked_is_checked_when_targets_are_needed(
    data, cache_dir, checks
):
    folder = data / "multicoil_test"  # fastMRI's test layout: a mask, no target
    CheckedSliceDataset(folder, "multicoil", require_target=False, header_cache=True)
    checks.clear()
    CheckedSliceDataset(folder, "multicoil", require_target=False, header_cache=True)
    assert checks == []
    with pytest.raises(DataError, match="missing target dataset 'reconstruction_rss'"):
        CheckedSliceDataset(folder, "multicoil", require_target=True, header_cache=True)
    # a training split cached once serves a scan that needs no targets as well
    train = data / "multicoil_train"
    CheckedSliceDataset(train, "multicoil", require_target=True, header_cache=True)
    checks.clear()
    CheckedSliceDataset(train, "multicoil", require_target=False, header_cache=True)
    assert checks == []


def test_a_damaged_or_unwritable_cache_costs_a_scan_not_the_run(data, tmp_path, monkeypatch):
    folder = data / "singlecoil_train"
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SFTKD_FASTMRI_CACHE_DIR", str(blocked))
    with pytest.warns(UserWarning, match="could not write the header cache"):
        ds = CheckedSliceDataset(folder, "singlecoil", header_cache=True)
    assert len(ds) == 6
    monkeypatch.setenv("SFTKD_FASTMRI_CACHE_DIR", str(tmp_path / "cache"))
    cache = HeaderCache(folder, "singlecoil")
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text('{"version": 1, "volumes": ')  # cut short
    assert len(CheckedSliceDataset(folder, "singlecoil", header_cache=True)) == 6
    written = json.loads(cache.path.read_text())  # rewritten whole
    assert written["folder"] == str(folder.resolve()) and len(written["volumes"]) == 3
    # the same folder read as multi-coil data has a cache of its own
    assert HeaderCache(folder, "multicoil").path != cache.path


def test_the_data_module_caches_unless_told_not_to(data, cache_dir):
    from sftkd_fastmri.pl_modules import FastMRIDataModule

    FastMRIDataModule(data, "singlecoil", dataset_cache=False).dataset("train")
    assert not cache_dir.exists()
    FastMRIDataModule(data, "singlecoil").dataset("train")
    assert len(list((cache_dir / "headers").iterdir())) == 1


def test_metadata_values_round_trip_with_their_types():
    values = {
        "padding_left": 3,
        "encoding_size": (640, 368, 1),
        "max": np.float64(0.000123456789),
        "norm": np.float32(1.1),
        "slices": np.int64(7),
        "flag": np.bool_(True),
        "name": "AXT1",
        "np_name": np.str_("FLAIR"),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "none": None,
    }
    for key, value in values.items():
        back = _decode(json.loads(json.dumps(_encode(value))))
        assert _same(back, value), key
    with pytest.raises(TypeError):
        _encode(b"bytes")  # such a volume is not remembered (read each time)


def test_whether_a_split_has_targets_comes_from_the_cache(data, cache_dir, monkeypatch):
    from sftkd_fastmri.pl_modules import data_module

    opened = []
    real = h5py.File

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data_module.h5py, "File", counting)
    for split, expected in (("multicoil_test_full", True), ("multicoil_test", False)):
        folder = data / split
        assert data_module.split_has_targets(folder, "multicoil", use_cache=True) is expected
        CheckedSliceDataset(folder, "multicoil", require_target=False, header_cache=True)
        opened.clear()
        assert data_module.split_has_targets(folder, "multicoil", use_cache=True) is expected
        assert opened == []  # every volume answered by the cache
        # a volume added since the scan is opened, and its missing target found
        extra = folder / "zz_added.h5"
        shutil.copy(data / "multicoil_test" / sorted(os.listdir(data / "multicoil_test"))[0], extra)
        assert data_module.split_has_targets(folder, "multicoil", use_cache=True) is False
        extra.unlink()
