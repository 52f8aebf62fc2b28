"""ShapeBatchSampler: batches of one k-space shape, every slice once, DDP-equal batch counts."""

from __future__ import annotations

import h5py
import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

from sftkd_fastmri.data import CheckedSliceDataset, ShapeBatchSampler, slice_shapes

SHAPES = ["a"] * 7 + ["b"] * 5 + ["c"] * 2  # 14 indices, three shapes


def _random(n, seed):
    return RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))


def _check_partition(batches, shapes, batch_size):
    seen = [i for batch in batches for i in batch]
    assert sorted(seen) == list(range(len(shapes)))  # every index exactly once
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({shapes[i] for i in batch}) == 1


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 20])
def test_batches_hold_one_shape_and_every_index_once(batch_size):
    sampler = ShapeBatchSampler(_random(len(SHAPES), 0), batch_size, shapes=SHAPES)
    batches = list(sampler)
    _check_partition(batches, SHAPES, batch_size)
    assert len(sampler) == len(batches)
    # one partial batch per shape at most: ceil(7/b) + ceil(5/b) + ceil(2/b)
    assert len(batches) == sum(-(-n // batch_size) for n in (7, 5, 2))


def test_order_follows_the_sampler_and_drop_last_drops_partial_batches():
    sampler = ShapeBatchSampler(SequentialSampler(range(len(SHAPES))), 3, shapes=SHAPES)
    # full batches as they fill; partial ones at the end, in the order their shapes appeared
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [7, 8, 9], [6], [10, 11], [12, 13]]
    interleaved = ["a", "b", "a", "b", "a", "a", "b"]
    got = list(ShapeBatchSampler(SequentialSampler(range(7)), 2, shapes=interleaved))
    assert got == [[0, 2], [1, 3], [4, 5], [6]]
    dropped = ShapeBatchSampler(SequentialSampler(range(7)), 2, drop_last=True, shapes=interleaved)
    assert list(dropped) == [[0, 2], [1, 3], [4, 5]] and len(dropped) == 3


@pytest.mark.parametrize("drop_last", [False, True])
def test_one_shape_gives_pytorchs_batches(drop_last):
    for seed in (0, 1):
        ours = ShapeBatchSampler(_random(10, seed), 4, drop_last, shapes=["x"] * 10)
        theirs = BatchSampler(_random(10, seed), 4, drop_last)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.parametrize("replicas", [2, 3, 5])
@pytest.mark.parametrize("shuffle", [True, False])
def test_distributed_ranks_get_equal_batch_counts_covering_every_index(replicas, shuffle):
    data = list(range(len(SHAPES)))
    per_rank = []
    for rank in range(replicas):
        dist = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=3)
        sampler = ShapeBatchSampler(dist, 4, shapes=SHAPES)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
    everything = [batch for batches in per_rank for batch in batches]
    for batch in everything:
        assert len({SHAPES[i] for i in batch}) == 1
    assert {i for batch in everything for i in batch} == set(data)
    # padding repeats whole batches only as far as needed to even out the ranks
    assert len(everything) - sum(-(-n // 4) for n in (7, 5, 2)) < replicas


def test_distributed_order_changes_with_the_epoch_like_distributed_sampler():
    data = list(range(len(SHAPES)))
    dist = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0)
    sampler = ShapeBatchSampler(dist, 3, shapes=SHAPES)
    first, again = list(sampler), list(sampler)
    dist.set_epoch(1)  # what Lightning calls on batch_sampler.sampler every epoch
    assert first == again and list(sampler) != first


def test_shapes_are_read_from_the_dataset(mixed_root):
    folder = mixed_root / "multicoil_train"
    dataset = CheckedSliceDataset(folder, "multicoil")
    shapes = slice_shapes(dataset)
    assert len(shapes) == len(dataset.raw_samples) == 9
    for (fname, _, _), key in zip(dataset.raw_samples, shapes):
        with h5py.File(fname, "r") as hf:
            assert key == (hf["kspace"].shape[1:], hf["reconstruction_rss"].shape[1:])
    assert len(set(shapes)) == 2
    assert slice_shapes(dataset) is shapes  # cached
    # as Lightning re-creates a custom batch sampler around its DistributedSampler:
    rebuilt = ShapeBatchSampler(DistributedSampler(dataset, num_replicas=2, rank=1), 4)
    assert rebuilt.shapes == shapes


def test_a_dataset_without_shapes_is_refused_clearly():
    with pytest.raises(TypeError, match="pass shapes="):
        ShapeBatchSampler(SequentialSampler(range(4)), 2)
    with pytest.raises(ValueError, match="shapes has 3 entries for a dataset of 4 samples"):
        ShapeBatchSampler(SequentialSampler(range(4)), 2, shapes=["a", "b", "a"])


def test_files_without_targets_are_grouped_by_their_recon_size(demo_root, tmp_path):
    """fastMRI's test files carry no target: their output is cropped to the header's recon
    size, so two volumes of one k-space shape with other recon sizes must not share a batch
    (collating them failed)."""
    import shutil

    from sftkd_fastmri.data.ismrmrd import build_ismrmrd_header
    from sftkd_fastmri.pl_modules import FastMRIDataModule

    split = tmp_path / "singlecoil_test"
    split.mkdir()
    first, second = sorted((demo_root / "singlecoil_test").glob("*.h5"))[:2]
    shutil.copy(first, split / first.name)
    shutil.copy(second, split / second.name)
    with h5py.File(split / second.name, "r+") as hf:
        kshape = hf["kspace"].shape
        del hf["ismrmrd_header"]
        header = build_ismrmrd_header((kshape[1], kshape[2], 1), (40, 40, 1))
        hf.create_dataset("ismrmrd_header", data=header.encode())
    data = FastMRIDataModule(tmp_path, "singlecoil", batch_size=4, test_split="test")
    data.setup("test")
    seen = {}
    for batch in data.test_dataloader():
        size = tuple(batch.zero_filled.shape[-2:])
        assert len(set(batch.fname)) == 1  # 6 + 6 slices in batches of 4: a crop size each
        seen.setdefault(batch.fname[0], set()).add(size)
        seen[batch.fname[0]].add(tuple(int(c[0]) for c in batch.crop_size))
    assert seen[second.name] == {(40, 40)}
    assert len(seen[first.name]) == 1 and seen[first.name] != {(40, 40)}


def test_shapes_of_a_combined_dataset_use_each_parts_target(mixed_root):
    """fastMRI's CombinedSliceDataset has no recons_key of its own (h5py was asked for the
    key None); each part's target key is used for its slices."""
    from fastmri.data import CombinedSliceDataset

    roots = [mixed_root / "singlecoil_val", mixed_root / "multicoil_val"]
    combined = CombinedSliceDataset(roots, ["singlecoil", "multicoil"])
    shapes = slice_shapes(combined)
    assert len(shapes) == len(combined) == 18
    singles = [
        CheckedSliceDataset(roots[0], "singlecoil"),
        CheckedSliceDataset(roots[1], "multicoil"),
    ]
    assert shapes == slice_shapes(singles[0]) + slice_shapes(singles[1])
    assert all(target is not None for _, target in shapes)  # both targets were found
    _check_partition(list(ShapeBatchSampler(SequentialSampler(combined), 4)), shapes, 4)


def test_lightnings_predict_sampler_gets_no_repeated_batches():
    """Lightning's predict sampler lets ranks run different step counts; padding it with
    repeated batches predicted those slices twice."""
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    data = list(range(len(SHAPES)))
    per_rank = []
    for rank in range(3):
        dist = UnrepeatedDistributedSampler(data, num_replicas=3, rank=rank, shuffle=False)
        sampler = ShapeBatchSampler(dist, 4, shapes=SHAPES)
        per_rank.append(list(sampler))
        assert len(sampler) == len(per_rank[-1])
    everything = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(everything) == data  # every slice once
