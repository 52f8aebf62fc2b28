"""FastMRIDataModule over the demo splits; fastmri_dirs.yaml helper."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, RandomSampler

from sftkd_fastmri.data import ShapeBatchSampler
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


def test_volume_sample_rate_keeps_whole_volumes_drawn_from_the_seed(demo_root):
    import random
    from collections import Counter

    def subset(seed, disturb):
        random.seed(disturb)  # whatever ran before must not change the subset
        data = FastMRIDataModule(demo_root, "singlecoil", volume_sample_rate=0.5, seed=seed)
        samples = data.dataset("train").raw_samples
        return Counter(sample[0].name for sample in samples)

    first = subset(0, 1)
    assert len(first) == 2 and set(first.values()) == {10}  # 2 of 4 volumes, every slice
    assert subset(0, 2) == first
    assert any(subset(seed, 1) != first for seed in range(1, 6))
    assert (
        len(FastMRIDataModule(demo_root, "singlecoil", volume_sample_rate=0.5).dataset("val")) == 12
    )
    with pytest.raises(ValueError, match="not both"):
        FastMRIDataModule(demo_root, "singlecoil", sample_rate=0.5, volume_sample_rate=0.5)
    with pytest.raises(ValueError, match="volume_sample_rate must be in"):
        FastMRIDataModule(demo_root, "singlecoil", volume_sample_rate=0.0)


def test_validation_and_test_subsets_have_rates_of_their_own(demo_root):
    """fastMRI's ``val_sample_rate`` / ``test_volume_sample_rate`` and kin: each split keeps
    its own fraction, drawn from the seed; the predict split keeps every slice."""
    from collections import Counter

    def volumes(dataset):
        return Counter(sample[0].name for sample in dataset.raw_samples)

    full_val = volumes(FastMRIDataModule(demo_root, "singlecoil").dataset("val"))
    data = FastMRIDataModule(
        demo_root,
        "singlecoil",
        val_volume_sample_rate=0.5,
        test_sample_rate=0.5,
        test_split="test_full",
    )
    assert len(data.dataset("train")) == 40
    val = volumes(data.dataset("val"))
    assert 0 < len(val) < len(full_val)
    assert all(count == full_val[name] for name, count in val.items())  # whole volumes
    assert val == volumes(
        FastMRIDataModule(demo_root, "singlecoil", val_volume_sample_rate=0.5).dataset("val")
    )
    test_full = len(
        FastMRIDataModule(demo_root, "singlecoil", test_split="test_full").dataset("test")
    )
    assert 0 < len(data.dataset("test")) < test_full
    assert len(data.dataset("predict")) == test_full  # every slice of the predict split
    assert len(FastMRIDataModule(demo_root, "singlecoil", val_sample_rate=0.5).dataset("val")) < 12

    with pytest.raises(ValueError, match="give val_sample_rate .* or val_volume_sample_rate"):
        FastMRIDataModule(demo_root, "singlecoil", val_sample_rate=0.5, val_volume_sample_rate=0.5)
    with pytest.raises(ValueError, match="test_sample_rate must be in"):
        FastMRIDataModule(demo_root, "singlecoil", test_sample_rate=1.5)


def test_combine_train_val_trains_on_both_splits_under_one_transform(demo_root):
    data = FastMRIDataModule(demo_root, "singlecoil", combine_train_val=True, batch_size=4)
    train = data.dataset("train")
    folders = {sample[0].parent.name for sample in train.raw_samples}
    assert folders == {"singlecoil_train", "singlecoil_val"} and len(train) == 40 + 12
    assert len(data.dataset("val")) == 12  # validation still runs
    names = {fname for batch in data.train_dataloader() for fname in batch.fname}
    assert len(names) == 4 + len({sample[0].name for sample in data.dataset("val").raw_samples})
    batch = next(iter(data.train_dataloader()))
    assert batch.target.shape[-2:] == (80, 64)
    # the validation volumes draw fresh training masks, from the one counter a resume restores
    calls = data.state_dict()["train_mask_calls"]
    assert calls > len(train)
    halved = FastMRIDataModule(demo_root, "singlecoil", combine_train_val=True, sample_rate=0.5)
    assert len(halved.dataset("train")) < 52
    # a rate that keeps none of the validation volumes trains on the training ones it keeps
    # (fastMRI rounds per split: 0.2 x 4 -> 1, 0.2 x 2 -> 0)
    few = FastMRIDataModule(demo_root, "singlecoil", combine_train_val=True, volume_sample_rate=0.2)
    assert {s[0].parent.name for s in few.dataset("train").raw_samples} == {"singlecoil_train"}


def test_subsets_leave_pythons_random_state_alone(demo_root):
    import random

    random.seed(7)
    expected = [random.random() for _ in range(3)]
    random.seed(7)
    FastMRIDataModule(demo_root, "singlecoil", sample_rate=0.5).dataset("train")
    assert [random.random() for _ in range(3)] == expected


def test_multicoil_batches_carry_sensitivities(demo_root):
    data = FastMRIDataModule(demo_root, "multicoil", batch_size=2)
    batch = next(iter(data.val_dataloader()))
    kspace = batch.masked_kspace
    assert kspace.ndim == 5 and kspace.shape[1] > 1 and batch.sens_maps.shape == kspace.shape


@pytest.mark.parametrize("challenge", ["singlecoil", "multicoil"])
def test_volumes_of_several_shapes_are_batched_by_shape(mixed_root, challenge):
    # fastMRI knee widths and brain coil counts differ between volumes: every batch must stack,
    # and every slice of a split must still come exactly once.
    data = FastMRIDataModule(mixed_root, challenge, batch_size=2, kspace_from_target=False)
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader()):
        assert isinstance(loader.batch_sampler, ShapeBatchSampler)
        slices, widths = [], set()
        for batch in loader:
            slices += [(f, int(s)) for f, s in zip(batch.fname, batch.slice_num)]
            widths.add(batch.masked_kspace.shape[-2])
        expected = [(sample[0].name, sample[1]) for sample in loader.dataset.raw_samples]
        assert len(expected) == 9 and sorted(slices) == sorted(expected)
        assert widths == {24, 28}
    assert isinstance(data.train_dataloader().batch_sampler.sampler, RandomSampler)


def test_one_shape_keeps_pytorchs_batching(demo_root):
    data = FastMRIDataModule(demo_root, "singlecoil", batch_size=4)
    assert type(data.train_dataloader().batch_sampler) is BatchSampler
    assert type(data.val_dataloader().batch_sampler) is BatchSampler


def test_bad_arguments():
    with pytest.raises(ValueError, match="challenge"):
        FastMRIDataModule("x", "dualcoil")
    with pytest.raises(ValueError, match="mask type"):
        FastMRIDataModule("x", mask_type="spiral")
    # a centre taking the whole budget failed at the first batch (ZeroDivisionError)
    with pytest.raises(ValueError, match=r"center_fraction 0.25 x acceleration 4 = 1 leaves"):
        FastMRIDataModule("x", mask_type="equispaced_fraction", center_fractions=[0.25])


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


class _SeenSlices(pl.Callback):
    """Writes, per rank, the sampler in use and the training slices of every step."""

    def __init__(self, out_dir) -> None:
        self.out_dir = out_dir
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([[f, int(s)] for f, s in zip(batch.fname, batch.slice_num)])

    def on_train_end(self, trainer, pl_module):
        loader = trainer.train_dataloader
        record = {
            "sampler": type(loader.batch_sampler.sampler).__name__,
            "shuffle": loader.batch_sampler.sampler.shuffle,
            "batch_sampler": type(loader.batch_sampler).__name__,
            "steps": self.steps,
        }
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("own_sampler", [False, True])
def test_ddp_ranks_run_equal_steps_over_volumes_of_several_shapes(
    mixed_root, tmp_path, own_sampler
):
    """2 CPU processes: Lightning's injected DistributedSampler (or the data module's own)
    under the shape batch sampler; unequal step counts per rank would hang the run."""
    from sftkd_fastmri.pl_modules import DCCNNModule

    data = FastMRIDataModule(
        mixed_root, "singlecoil", batch_size=2, distributed_sampler=own_sampler
    )
    module = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4, "num_cascades": 2})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=not own_sampler,
        default_root_dir=tmp_path,
        callbacks=[_SeenSlices(tmp_path)],
    )
    trainer.fit(module, datamodule=data)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in ranks:
        assert record["batch_sampler"] == "ShapeBatchSampler"
        assert record["sampler"] == "DistributedSampler" and record["shuffle"] is True
    steps = [record["steps"] for record in ranks]
    # 6 slices of one shape, 3 of the other: batches 2+2+2 and 2+1, padded to 6 for 2 ranks
    assert len(steps[0]) == len(steps[1]) == 3
    seen = {tuple(s) for rank in steps for batch in rank for s in batch}
    assert len(seen) == 9  # every training slice on some rank


def test_a_checkpoints_mask_counter_waits_for_the_training_data(demo_root, tmp_path):
    """Lightning hands the saved counter back for test / validate / predict from a
    checkpoint too: it built the training dataset, failing where no train split exists."""
    import shutil

    only_test = tmp_path / "data"
    shutil.copytree(demo_root / "singlecoil_test_full", only_test / "singlecoil_test_full")
    data = FastMRIDataModule(only_test, "singlecoil", test_split="test_full")
    data.load_state_dict({"train_mask_calls": 7})
    data.setup("test")
    assert next(iter(data.test_dataloader())).masked_kspace.ndim == 5
    assert data.state_dict() == {"train_mask_calls": 7}  # kept for a later save
    full = FastMRIDataModule(demo_root, "singlecoil")
    full.load_state_dict({"train_mask_calls": 7})
    full.setup("fit")  # a resumed fit: the counter reaches the training transform
    assert full.dataset("train").transform._calls == 7


def test_workers_start_afresh_each_epoch_unless_asked_to_persist(demo_root):
    """Persistent workers keep seeds and mask counts that no checkpoint holds, so a resumed
    run could not draw the uninterrupted run's masks: they are an explicit choice."""
    fresh = FastMRIDataModule(demo_root, "singlecoil", num_workers=1)
    fresh.setup("fit")
    assert not fresh.train_dataloader().persistent_workers
    kept = FastMRIDataModule(demo_root, "singlecoil", num_workers=1, persistent_workers=True)
    kept.setup("fit")
    assert kept.train_dataloader().persistent_workers
    assert kept.val_dataloader().persistent_workers
    none = FastMRIDataModule(demo_root, "singlecoil", persistent_workers=True)  # no workers
    none.setup("fit")
    assert not none.train_dataloader().persistent_workers


def test_a_mask_file_of_one_width_is_refused_before_training_on_other_widths(mixed_root, tmp_path):
    """fastMRI knee widths vary; a fixed mask read from a file stopped the run at the first
    slice of another width, maybe hours in: the split is checked when its data is built."""
    from sftkd_fastmri.data import DataError

    mask = np.zeros(24, np.float32)
    mask[10:14] = mask[::3] = 1
    np.save(tmp_path / "mask.npy", mask)
    data = FastMRIDataModule(mixed_root, "singlecoil", mask_path=tmp_path / "mask.npy")
    with pytest.raises(DataError, match=r"wide_.*\.h5: .*mask.npy: fixed mask has width 24, "
                       r"k-space has 28 columns; every volume of the train split"):  # fmt: skip
        data.setup("fit")
    # a generated fixed mask has one per width
    FastMRIDataModule(mixed_root, "singlecoil", fixed_mask=True).setup("fit")


def test_its_own_ddp_sharding_is_refused_where_it_would_lose_slices(demo_root, monkeypatch):
    """With Lightning's sampler still on, each rank's share was sharded again and half the
    validation slices silently went unscored; fewer volumes than ranks crashed in fastMRI's
    VolumeSampler with a ZeroDivisionError."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    data = FastMRIDataModule(demo_root, "singlecoil", distributed_sampler=True)
    data.trainer = SimpleNamespace(
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(ValueError, match=r"Trainer\(use_distributed_sampler=False\)"):
        data.val_dataloader()
    data.trainer._accelerator_connector.use_distributed_sampler = False
    one = sorted((demo_root / "singlecoil_val").iterdir())
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: len(one) + 1)
    with pytest.raises(ValueError, match=rf"{len(one)} volume\(s\) for {len(one) + 1} ranks"):
        data.val_dataloader()


def test_a_test_split_mixing_stored_mask_and_target_volumes_is_refused_at_setup(
    demo_root, tmp_path
):
    """One volume without a target switched the whole split to the stored masks; a volume
    with a target and no 'mask' then stopped the test midway, blaming the mask function."""
    import shutil

    from sftkd_fastmri.data import DataError

    split = tmp_path / "singlecoil_test"
    split.mkdir()
    shutil.copy(sorted((demo_root / "singlecoil_test").iterdir())[0], split / "a_test.h5")
    for i, volume in enumerate(sorted((demo_root / "singlecoil_test_full").iterdir())):
        shutil.copy(volume, split / f"b_full{i}.h5")
    for cache in (True, False):
        data = FastMRIDataModule(tmp_path, "singlecoil", dataset_cache=cache)
        with pytest.raises(
            DataError,
            match=r"the test split \(.*singlecoil_test\) mixes 1 volume\(s\) without a target "
            r"'reconstruction_esc' \(a_test.h5\), read with the 'mask' they store, and 2 with a "
            r"target but no 'mask' \(b_full0.h5, b_full1.h5\).*expected every volume with a "
            r"target .* or every volume with a 'mask'",
        ):
            data.setup("test")
        assert "test" not in data.datasets
    with pytest.raises(DataError, match="the predict split .* mixes"):
        FastMRIDataModule(tmp_path, "singlecoil").setup("predict")
    # asked for the stored masks of volumes that have none
    stored = FastMRIDataModule(demo_root, "singlecoil", test_split="test_full",
                               test_uses_stored_mask=True)  # fmt: skip
    with pytest.raises(DataError, match=r"test_uses_stored_mask=True, but 2 volume\(s\) hold no"):
        stored.setup("test")
    # undersampled with the mask function, every volume reads
    drawn = FastMRIDataModule(tmp_path, "singlecoil", test_uses_stored_mask=False)
    drawn.setup("test")
    assert len(list(drawn.test_dataloader())) == len(drawn.dataset("test"))
