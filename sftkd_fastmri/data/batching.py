"""Batches of slices that share one k-space shape.

fastMRI volumes differ in shape: knee k-space widths vary between volumes (368, 372, ...
columns), brain volumes in coil count (4 to 20) and matrix size. PyTorch's default collate
stacks the slices of a batch, so any batch size above 1 fails on the first batch that mixes
two shapes (``stack expects each tensor to be equal size``). :class:`ShapeBatchSampler` fills
one batch per shape from the order its sampler gives, so every batch stacks, every slice is
still seen once per epoch, and with one shape in the data it yields exactly the batches of
PyTorch's ``BatchSampler``.

Under DDP (a :class:`~torch.utils.data.DistributedSampler` as its sampler, as Lightning
injects it or as ``FastMRIDataModule(distributed_sampler=True)`` passes it), sharding slices
first would leave each rank with different numbers of partial batches, and ranks that run
different numbers of steps hang. The batches are therefore formed over the whole dataset in
the order the distributed sampler would shuffle it (its ``seed + epoch``), padded by repeating
the first batches to a multiple of the number of ranks, and dealt out to the ranks, so every
rank runs the same number of steps.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, Hashable, Iterator, List, Optional, Sequence

import h5py
import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from .transforms import DataError

__all__ = ["ShapeBatchSampler", "slice_shapes"]

_CACHE = "_sftkd_slice_shapes"


def slice_shapes(dataset) -> List[Hashable]:
    """The shape key of every slice of a fastMRI ``SliceDataset`` or ``CombinedSliceDataset``
    (in ``raw_samples`` order):
    the per-slice shape of ``kspace`` and of the target (without one, the header's recon size
    the output is cropped to, or ``None``). Slices with
    equal keys give equal-shaped samples under one transform.

    Each file is opened once; h5py reads shapes from the file's metadata, not its arrays. The
    result is cached on the dataset.

    Raises:
        TypeError: ``dataset`` has no fastMRI ``raw_samples``.
        DataError: a file cannot be read or lacks ``kspace``.
    """
    cached = getattr(dataset, _CACHE, None)
    if cached is not None and len(cached) == len(dataset.raw_samples):
        return cached
    if not hasattr(dataset, "raw_samples"):
        raise TypeError(
            f"{type(dataset).__name__} has no raw_samples; pass shapes= (one hashable shape key "
            "per dataset index) or use a fastMRI SliceDataset"
        )
    # fastMRI's CombinedSliceDataset concatenates the raw_samples of its datasets, each
    # with its own target key (reconstruction_esc / _rss); a SliceDataset is its own part
    parts = list(getattr(dataset, "datasets", None) or [dataset])
    if sum(len(getattr(part, "raw_samples", ())) for part in parts) != len(dataset.raw_samples):
        parts = [dataset]
    by_file: Dict[tuple, Hashable] = {}
    keys = []
    for part in parts:
        target_key = getattr(part, "recons_key", None)
        for sample in part.raw_samples:
            keys.append(_shape_key(Path(sample[0]), sample, target_key, by_file))
    try:
        setattr(dataset, _CACHE, keys)
    except AttributeError:
        pass  # a dataset with __slots__: recompute next time
    return keys


def _shape_key(
    fname: Path, sample: Sequence, target_key: Optional[str], by_file: Dict[tuple, Hashable]
) -> Hashable:
    """One slice's shape key; each file is opened once (``by_file`` remembers it)."""
    if (fname, target_key) in by_file:
        return by_file[fname, target_key]
    try:
        with h5py.File(fname, "r") as hf:
            has_target = target_key is not None and target_key in hf
            target = hf[target_key].shape[1:] if has_target else None
            if target is None:
                # No target (fastMRI's test files): the output is cropped to the header's
                # recon size, which two files of one k-space shape may differ in.
                metadata = sample[2] if len(sample) > 2 else None
                recon = metadata.get("recon_size") if isinstance(metadata, dict) else None
                target = ("recon_size", tuple(recon[:2])) if recon is not None else None
            key = (tuple(hf["kspace"].shape[1:]), target)
    except (OSError, KeyError) as err:
        raise DataError(f"{fname}: cannot read the shape of 'kspace': {err}") from err
    by_file[fname, target_key] = key
    return key


def _unrepeated(sampler: DistributedSampler) -> bool:
    """Lightning's ``UnrepeatedDistributedSampler`` (predict): no padding to equal lengths.
    Known by name: this layer does not import Lightning."""
    return any(c.__name__ == "UnrepeatedDistributedSampler" for c in type(sampler).__mro__)


class ShapeBatchSampler(BatchSampler):
    """Batch sampler whose batches hold slices of one shape only (see the module docstring).

    Indices come in the order of ``sampler``; each goes into the pending batch of its shape,
    and a batch is yielded as soon as it is full. Partial batches follow at the end of the
    epoch (in the order their shapes first appeared) unless ``drop_last``. With a
    ``DistributedSampler``, batches are formed over the whole dataset and dealt out to the
    ranks so that every rank gets the same number.

    Args:
        sampler: Index sampler (``RandomSampler`` for training, ``SequentialSampler`` or
            fastMRI's ``VolumeSampler`` for evaluation, or a ``DistributedSampler``).
        batch_size: Slices per batch (at most; a shape's last batch may be smaller).
        drop_last: Drop each shape's last, partial batch.
        shapes: One hashable shape key per dataset index; by default
            :func:`slice_shapes` of the sampler's dataset (``sampler.dataset`` or
            ``sampler.data_source``).

    Example::

        dataset = CheckedSliceDataset("knee/singlecoil_train", "singlecoil", transform=...)
        loader = DataLoader(dataset, batch_sampler=ShapeBatchSampler(RandomSampler(dataset), 4))
    """

    def __init__(
        self,
        sampler: Sampler,
        batch_size: int,
        drop_last: bool = False,
        shapes: Optional[Sequence[Hashable]] = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        dataset = getattr(sampler, "dataset", getattr(sampler, "data_source", None))
        if shapes is None:
            if dataset is None:
                raise TypeError(
                    f"cannot find the dataset of {type(sampler).__name__}; pass shapes= (one "
                    "shape key per dataset index)"
                )
            shapes = slice_shapes(dataset)
        self.shapes = list(shapes)
        if dataset is not None and hasattr(dataset, "__len__"):
            if len(self.shapes) != len(dataset):
                raise ValueError(
                    f"shapes has {len(self.shapes)} entries for a dataset of {len(dataset)} "
                    "samples; expected one shape key per dataset index"
                )

    # -- grouping -------------------------------------------------------------------------
    def _group(self, indices) -> Iterator[List[int]]:
        pending: Dict[Hashable, List[int]] = {}
        for index in indices:
            batch = pending.setdefault(self.shapes[index], [])
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                pending[self.shapes[index]] = []
        if not self.drop_last:
            for batch in pending.values():
                if batch:
                    yield batch

    def _batches_of(self, counts: Counter) -> int:
        if self.drop_last:
            return sum(n // self.batch_size for n in counts.values())
        return sum(-(-n // self.batch_size) for n in counts.values())

    # -- distributed ----------------------------------------------------------------------
    def _distributed_batches(self, sampler: DistributedSampler) -> List[List[int]]:
        size = len(sampler.dataset)
        if sampler.shuffle:  # the permutation DistributedSampler draws for this epoch
            generator = torch.Generator()
            generator.manual_seed(sampler.seed + sampler.epoch)
            order = torch.randperm(size, generator=generator).tolist()
        else:
            order = list(range(size))
        batches = list(self._group(order))
        ranks = sampler.num_replicas
        if _unrepeated(sampler):
            # Lightning's predict sampler: ranks may run different numbers of steps, and a
            # repeated batch would be predicted twice
            return batches[sampler.rank :: ranks]
        if sampler.drop_last:
            batches = batches[: len(batches) - len(batches) % ranks]
        elif batches and len(batches) % ranks:
            missing = ranks - len(batches) % ranks
            batches += (batches * (missing // len(batches) + 1))[:missing]
        return batches[sampler.rank :: ranks]

    def _distributed_len(self, sampler: DistributedSampler) -> int:
        total = self._batches_of(Counter(self.shapes))
        ranks = sampler.num_replicas
        if _unrepeated(sampler):
            return len(range(sampler.rank, total, ranks))
        return total // ranks if sampler.drop_last else -(-total // ranks)

    # -- BatchSampler API -----------------------------------------------------------------
    def __iter__(self) -> Iterator[List[int]]:
        if isinstance(self.sampler, DistributedSampler):
            yield from self._distributed_batches(self.sampler)
        else:
            yield from self._group(self.sampler)

    def __len__(self) -> int:
        if isinstance(self.sampler, DistributedSampler):
            return self._distributed_len(self.sampler)
        sampler = self.sampler
        if isinstance(sampler, SequentialSampler) or (
            isinstance(sampler, RandomSampler)
            and not sampler.replacement
            and sampler.num_samples == len(sampler.data_source)
        ):
            # every index once, whatever the order: no need to draw a permutation (drawing
            # one would consume the random state the epoch's own shuffle uses)
            counts = Counter(self.shapes)  # one key per dataset index (checked in __init__)
        else:
            counts = Counter(self.shapes[i] for i in sampler)
        return self._batches_of(counts)
