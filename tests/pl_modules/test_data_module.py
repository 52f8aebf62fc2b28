"""FastMRIDataModule over the demo splits; fastmri_dirs.yaml helper."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from sftkd_fastmri.pl_modules import FastMRIDataModule, fetch_dir, split_has_targets


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny tensors: a second intra-op thread buys nothing, and when other processes share
    # the two cores its spin-waits slowed a 5 s fit to over 2 minutes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _columns(mask: torch.Tensor) -> np.ndarray:
    return mask.reshape(-1).numpy().astype(bool)


def test_loaders_for_every_split(demo_root):
    data = FastMRIDataModule(demo_root, "singlecoil", batch_size=4)
    data.setup("fit")
    assert len(data.train_dataloader().dataset) == 40
    assert len(data.val_dataloader().dataset) == 12
    batch = next(iter(data.val_dataloader()))
    assert batch.masked_kspace.shape == (4, 1, 80, 64, 2)  # readout oversampling removed
    assert batch.target.shape == (4, 80, 64) and batch.sens_maps.numel() == 0

    test = next(iter(data.test_dataloader()))  # fastMRI-style: no target, stored mask
    assert test.target.numel() == 0
    fname = test.fname[0]
    with h5py.File(demo_root / "singlecoil_test" / fname, "r") as hf:
        stored = hf["mask"][()].astype(bool)
    np.testing.assert_array_equal(_columns(test.mask[0]), stored)
    assert len(next(iter(data.predict_dataloader())).fname) == 4

    full = FastMRIDataModule(demo_root, "singlecoil", batch_size=4, test_split="test_full")
    batch = next(iter(full.test_dataloader()))
    assert batch.target.shape == (4, 80, 64)


def test_split_has_targets(demo_root):
    assert split_has_targets(demo_root / "singlecoil_val", "singlecoil")
    assert split_has_targets(demo_root / "multicoil_test_full", "multicoil")
    assert not split_has_targets(demo_root / "singlecoil_test", "singlecoil")
    assert not split_has_targets(demo_root / "missing", "singlecoil")


def test_training_masks_change_validation_masks_fixed_per_volume(demo_root):
    data = FastMRIDataModule(demo_root, "singlecoil", accelerations=(4,), seed=3)
    train, val = data.dataset("train"), data.dataset("val")
    assert not np.array_equal(_columns(train[0].mask), _columns(train[0].mask))

    by_volume = {}
    for i in range(len(val)):
        sample = val[i]
        by_volume.setdefault(sample.fname, []).append(_columns(sample.mask))
    assert len(by_volume) == 2
    for masks in by_volume.values():
        assert all(np.array_equal(masks[0], m) for m in masks)
    first, second = by_volume.values()
    assert not np.array_equal(first[0], second[0])  # seeded from the file name
    np.testing.assert_array_equal(_columns(val[0].mask), _columns(val[0].mask))


def test_fixed_mask_is_shared_by_all_training_slices(demo_root):
    data = FastMRIDataModule(demo_root, "singlecoil", fixed_mask=True, seed=1)
    train = data.dataset("train")
    masks = [_columns(train[i].mask) for i in (0, 0, 7, 23)]
    assert all(np.array_equal(masks[0], m) for m in masks)


def test_sample_rate_applies_to_training_only(demo_root):
    data = FastMRIDataModule(demo_root, "singlecoil", sample_rate=0.5)
    assert len(data.dataset("train")) < 40
    assert len(data.dataset("val")) == 12


def test_multicoil_batches_carry_sensitivities(demo_root):
    data = FastMRIDataModule(demo_root, "multicoil", batch_size=2)
    batch = next(iter(data.val_dataloader()))
    kspace = batch.masked_kspace
    assert kspace.ndim == 5 and kspace.shape[1] > 1 and batch.sens_maps.shape == kspace.shape


def test_bad_arguments():
    with pytest.raises(ValueError, match="challenge"):
        FastMRIDataModule("x", "dualcoil")
    with pytest.raises(ValueError, match="mask type"):
        FastMRIDataModule("x", mask_type="spiral")


def test_fetch_dir(tmp_path):
    config = tmp_path / "fastmri_dirs.yaml"
    config.write_text("knee_path: /data/knee\nbrain_path: /data/brain\nlog_path: logs\n")
    assert str(fetch_dir("brain_path", config)) == "/data/brain"
    with pytest.raises(KeyError, match="prostate_path"):
        fetch_dir("prostate_path", config)
    missing = tmp_path / "absent.yaml"
    with pytest.raises(FileNotFoundError):
        fetch_dir("knee_path", missing)
    assert not missing.exists()  # fastMRI would have written a placeholder template
