"""Lightning 2 data module over fastMRI split folders, feeding :class:`DCCNNSample` batches.

The datasets are :class:`~sftkd_fastmri.data.CheckedSliceDataset` (fastMRI's ``SliceDataset``
with input checks) and the transform is :class:`~sftkd_fastmri.data.DCCNNDataTransform`.
No ``worker_init_fn`` is needed: the training transform seeds every mask from
``(seed, rank, worker seed, call counter)`` itself, and evaluation masks are fixed per volume
(seeded from the file name), so masks are reproducible with any number of workers.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import h5py
import pytorch_lightning as pl
import torch
from fastmri.data import VolumeSampler
from fastmri.data.mri_data import fetch_dir as _fastmri_fetch_dir
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from ..data import (
    CheckedSliceDataset,
    DataError,
    DCCNNDataTransform,
    FixedMaskFunc,
    ShapeBatchSampler,
    create_mask_func,
    slice_shapes,
    split_dir,
)
from ..data.datasets import TARGET_KEYS, EmptySubsetError, check_volume
from ..data.header_cache import HeaderCache

__all__ = ["FastMRIDataModule", "fetch_dir", "split_has_targets"]

PathLike = Union[str, os.PathLike]
FASTMRI_DIR_KEYS = ("knee_path", "brain_path", "log_path")


def fetch_dir(key: str, data_config_file: PathLike = "fastmri_dirs.yaml") -> Path:
    """A folder from fastMRI's ``fastmri_dirs.yaml`` (keys ``knee_path``, ``brain_path``,
    ``log_path``), read with :func:`fastmri.data.mri_data.fetch_dir`.

    Unlike fastMRI's function, a missing file is an error: fastMRI writes a template with
    placeholder paths (``/path/to/knee``) and returns the placeholder.

    Raises:
        FileNotFoundError: the config file does not exist.
        KeyError: the file has no entry ``key``.
    """
    config = Path(data_config_file)
    if not config.is_file():
        raise FileNotFoundError(
            f"{config}: no fastMRI path config; write a YAML file with "
            f"{', '.join(FASTMRI_DIR_KEYS)} (fastMRI's fastmri_dirs.yaml convention)"
        )
    try:
        return _fastmri_fetch_dir(key, config)
    except (KeyError, TypeError) as err:  # TypeError: an empty YAML file loads as None
        raise KeyError(f"{config}: no entry {key!r} (expected one of {FASTMRI_DIR_KEYS})") from err


def split_has_targets(folder: PathLike, challenge: str, use_cache: bool = False) -> bool:
    """Whether every ``.h5`` volume of ``folder`` holds the challenge's target dataset.

    ``use_cache``: answer for the volumes the header cache remembers unchanged
    (:class:`~sftkd_fastmri.data.header_cache.HeaderCache`) without opening them.

    Raises:
        DataError: an entry the reader would refuse too (a stray non-HDF5 file, a damaged
            file, a subfolder, a broken link), named, rather than "no targets".
    """
    key = TARGET_KEYS[challenge]
    folder = Path(folder)
    if not folder.is_dir():
        return False  # CheckedSliceDataset reports the missing folder
    entries = sorted(folder.iterdir())
    if not entries:
        return False
    cache = HeaderCache(folder, challenge) if use_cache else None
    for path in entries:
        remembered = cache.has_target(path) if cache is not None else None
        if remembered is not None:
            if not remembered:
                return False
            continue
        if path.is_dir() or not path.exists() or not h5py.is_hdf5(path):
            check_volume(path, challenge, require_target=False)  # raises, naming it
        try:
            hf = h5py.File(path, "r")
        except OSError:  # a damaged file: the reader's checks report it by name
            check_volume(path, challenge, require_target=False)
            raise
        with hf:
            if key not in hf:
                return False
    return True


def _some(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, and how many more."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


class FastMRIDataModule(pl.LightningDataModule):
    """Train/val/test/predict loaders of fastMRI-layout data (``{challenge}_{split}`` folders).

    Training masks are drawn anew for every call (training transform); validation and test
    masks are fixed per volume. A test split without targets (fastMRI's test/challenge files)
    uses the ``mask`` stored in its files; a test split with targets (e.g. the demo data's
    ``test_full``) is undersampled like the validation split and yields test metrics.

    Args:
        data_path: root holding ``{challenge}_{split}`` folders.
        challenge: ``"singlecoil"`` or ``"multicoil"``.
        mask_type: fastMRI mask type (see :data:`~sftkd_fastmri.data.MASK_TYPES`).
        center_fractions: fully sampled centre fractions (one per acceleration).
        accelerations: acceleration factors.
        fixed_mask: one mask for every slice (the SFT-KD-Recon protocol).
        mask_path: ``.npy`` 1-D fixed mask (overrides the mask arguments).
        seed: seed of the training masks and of the fixed mask.
        batch_size: batch size of every loader. Where a split holds volumes of several
            shapes (fastMRI knee widths, brain coil counts and matrix sizes), each batch takes
            slices of one shape (:class:`~sftkd_fastmri.data.ShapeBatchSampler`); a shape's
            last batch of an epoch may be smaller.
        num_workers: DataLoader workers.
        persistent_workers: keep the workers between epochs (``num_workers > 0``). Off by
            default: workers started afresh each epoch take their seeds from the generators
            that :class:`~sftkd_fastmri.callbacks.RandomStateCheckpoint` saves, so a run
            resumed at an epoch end draws the training masks and batches the uninterrupted
            run draws, with any ``num_workers``. On saves each epoch's worker start (seconds
            where workers are spawned, not forked: macOS, Windows) but a resumed run then
            draws other masks than the uninterrupted one would have.
        sample_rate: fraction of training slices to use (``None``: all), drawn from ``seed``.
        volume_sample_rate: fraction of training volumes to use, all slices of each (``None``:
            all), drawn from ``seed``; not together with ``sample_rate``.
        val_sample_rate, val_volume_sample_rate: the same for the validation split (a faster
            validation on fastMRI's 199 knee or 378 brain validation volumes; with a fraction
            of slices, each volume's metrics are taken over the slices kept).
        test_sample_rate, test_volume_sample_rate: the same for the test split (not the
            predict split, which always yields every slice).
        combine_train_val: train on the training and validation splits together (fastMRI's
            ``combine_train_val``, e.g. for a leaderboard submission); validation still runs
            on the validation split, whose metrics are then taken on training data.
        kspace_from_target: build single-coil k-space from the target magnitude (the paper's
            retrospective protocol) instead of the stored k-space.
        crop_readout: remove readout oversampling (exact; halves the work).
        train_split, val_split, test_split: split names (folder suffixes).
        predict_split: split of the predict loader (default: ``test_split``).
        test_uses_stored_mask: use the files' ``mask`` in the test split; ``None``: when the
            test files have no targets. With the stored masks every volume must hold a
            ``mask``: a split mixing volumes without target and volumes with a target but no
            ``mask`` is refused at setup.
        distributed_sampler: under DDP, shard training with ``DistributedSampler`` and keep
            each evaluation volume on one rank (fastMRI's ``VolumeSampler``). Pair with
            ``Trainer(use_distributed_sampler=False)``. Not needed for correct metrics:
            :class:`~sftkd_fastmri.pl_modules.ReconModule` merges slices across ranks.
        dataset_cache: remember each volume's header and checks between runs, so a split
            whose files did not change is scanned without opening them (see
            :mod:`sftkd_fastmri.data.header_cache`; the cache lives in
            ``$SFTKD_FASTMRI_CACHE_DIR``, else ``~/.cache/sftkd_fastmri``).

    Against fastMRI's ``FastMriDataModule``: splits are folders under one ``data_path``
    (``train_split`` / ``val_split`` / ``test_split`` name them, instead of ``test_path``);
    the subsets of ``sample_rate`` and its kin are drawn from ``seed``, not from Python's
    global random state; ``dataset_cache`` replaces ``use_dataset_cache_file`` (fastMRI's
    pickle keyed by folder alone) with :class:`~sftkd_fastmri.data.header_cache.HeaderCache`,
    which reads a volume again whenever its file changed.
    """

    def __init__(
        self,
        data_path: PathLike,
        challenge: str = "singlecoil",
        mask_type: str = "random",
        center_fractions: Sequence[float] = (0.08,),
        accelerations: Sequence[int] = (4,),
        fixed_mask: bool = False,
        mask_path: Optional[PathLike] = None,
        seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        persistent_workers: bool = False,
        sample_rate: Optional[float] = None,
        volume_sample_rate: Optional[float] = None,
        val_sample_rate: Optional[float] = None,
        val_volume_sample_rate: Optional[float] = None,
        test_sample_rate: Optional[float] = None,
        test_volume_sample_rate: Optional[float] = None,
        combine_train_val: bool = False,
        kspace_from_target: bool = False,
        crop_readout: bool = True,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        predict_split: Optional[str] = None,
        test_uses_stored_mask: Optional[bool] = None,
        distributed_sampler: bool = False,
        dataset_cache: bool = True,
    ):
        super().__init__()
        if challenge not in TARGET_KEYS:
            raise ValueError(f"challenge must be 'singlecoil' or 'multicoil', got {challenge!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rates = {
            "train": (sample_rate, volume_sample_rate),
            "val": (val_sample_rate, val_volume_sample_rate),
            "test": (test_sample_rate, test_volume_sample_rate),
        }
        for stage, (slices, volumes) in self.rates.items():
            prefix = "" if stage == "train" else f"{stage}_"
            for name, rate in (
                (f"{prefix}sample_rate", slices),
                (f"{prefix}volume_sample_rate", volumes),
            ):
                if rate is not None and not 0.0 < rate <= 1.0:
                    raise ValueError(f"{name} must be in (0, 1], got {rate}")
            if slices not in (None, 1.0) and volumes not in (None, 1.0):
                raise ValueError(
                    f"give {prefix}sample_rate ({slices}, a fraction of slices) or "
                    f"{prefix}volume_sample_rate ({volumes}, a fraction of volumes), not both"
                )
        self.data_path = Path(data_path)
        self.challenge = challenge
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.persistent_workers = bool(persistent_workers)
        self.sample_rate = sample_rate
        self.volume_sample_rate = volume_sample_rate
        self.combine_train_val = bool(combine_train_val)
        self.kspace_from_target = kspace_from_target
        self.crop_readout = crop_readout
        self.splits = {
            "train": train_split,
            "val": val_split,
            "test": test_split,
            "predict": predict_split or test_split,
        }
        self.test_uses_stored_mask = test_uses_stored_mask
        self.distributed_sampler = distributed_sampler
        self.dataset_cache = bool(dataset_cache)
        # built eagerly: a wrong mask argument fails here, not in a worker
        self.mask_func = create_mask_func(
            mask_type,
            center_fractions,
            accelerations,
            fixed=fixed_mask,
            seed=seed,
            mask_path=mask_path,
        )
        self.datasets: Dict[str, CheckedSliceDataset] = {}
        self._pending_mask_calls: Optional[int] = None  # from a checkpoint, until train exists

    @property
    def input_challenge(self) -> str:
        """The kind of k-space the samples carry: ``"singlecoil"`` with ``kspace_from_target``
        (single-coil k-space simulated from the target, whatever the files hold), else the
        ``challenge``. Recorded in checkpoints as their input signature."""
        return "singlecoil" if self.kspace_from_target else self.challenge

    # -- datasets ---------------------------------------------------------------------------
    def split_folder(self, stage: str) -> Path:
        """Folder of ``stage`` (``"train"``, ``"val"``, ``"test"``, ``"predict"``)."""
        return split_dir(self.data_path, self.challenge, self.splits[stage])

    def transform(self, stage: str) -> DCCNNDataTransform:
        """The transform of ``stage``: a fresh mask per call in training, fixed otherwise."""
        training = stage == "train"
        mask_func = self.mask_func
        if stage in ("test", "predict"):
            stored = self.test_uses_stored_mask
            if stored is None:
                folder = self.split_folder(stage)
                stored = not split_has_targets(folder, self.challenge, self.dataset_cache)
            if stored:
                mask_func = None  # the files carry the mask they were acquired with
        return DCCNNDataTransform(
            mask_func,
            training=training,
            seed=self.seed,
            kspace_from_target=self.kspace_from_target,
            crop_readout=self.crop_readout,
        )

    def dataset(self, stage: str) -> CheckedSliceDataset:
        """The dataset of ``stage``, built on first use."""
        if stage not in self.datasets:
            folder = self.split_folder(stage)
            require_target = stage in ("train", "val") or split_has_targets(
                folder, self.challenge, self.dataset_cache
            )
            transform = self.transform(stage)
            dataset = self._read_split(folder, stage, transform, require_target)
            if stage == "train" and self.combine_train_val:
                # fastMRI's combine_train_val: the validation volumes join the training set,
                # under the training transform (one mask counter for both) and sample rates
                try:
                    val = self._read_split(self.split_folder("val"), stage, transform, True)
                except EmptySubsetError:  # a rate of few volumes keeps none here
                    rank_zero_info(
                        f"combine_train_val: the sample rate keeps no volume of "
                        f"{self.split_folder('val')}; training on {folder} alone"
                    )
                else:
                    dataset.raw_samples = list(dataset.raw_samples) + list(val.raw_samples)
                    rank_zero_info(
                        f"combine_train_val: training on {folder} and "
                        f"{self.split_folder('val')}; the validation metrics are then taken "
                        "on training data"
                    )
            self._check_stored_masks(stage, dataset)
            self.datasets[stage] = dataset
            self._check_mask_widths(stage, dataset)
            if stage == "train":
                self._apply_mask_calls(self.datasets[stage])  # a resumed run's counter
        return self.datasets[stage]

    def _read_split(
        self, folder: Path, stage: str, transform: Any, require_target: bool
    ) -> CheckedSliceDataset:
        """The dataset of one split folder, subsampled with ``stage``'s sample rates."""
        slices, volumes = self.rates.get(stage, (None, None))
        # fastMRI takes one of the two rates
        rates = (
            dict(volume_sample_rate=volumes)
            if volumes not in (None, 1.0)
            else dict(sample_rate=slices)
        )
        # fastMRI draws the subset with Python's global `random`: draw it from this module's
        # seed instead, so every run (and every stage of a study) uses the same subset
        # whatever ran before, and leave the global state as it was.
        state = random.getstate()
        random.seed(self.seed)
        try:
            return CheckedSliceDataset(
                folder,
                self.challenge,
                transform=transform,
                require_target=require_target,
                header_cache=self.dataset_cache,
                **rates,
            )
        finally:
            random.setstate(state)

    def _check_stored_masks(self, stage: str, dataset: CheckedSliceDataset) -> None:
        """A split read with the masks its files store (a test split with a volume without
        target, or ``test_uses_stored_mask=True``) needs a ``mask`` in every volume: refuse at
        setup a split mixing fastMRI test files (a ``mask``, no target) with volumes that have
        a target and no ``mask``, which would otherwise stop the test at the first of these."""
        if getattr(dataset.transform, "mask_func", None) is not None:
            return  # undersampled with the mask function
        folder = self.split_folder(stage)
        key = TARGET_KEYS[self.challenge]
        cache = HeaderCache(folder, self.challenge) if self.dataset_cache else None
        no_mask, no_target = [], []
        for fname in sorted({Path(sample[0]) for sample in dataset.raw_samples}):
            if cache is not None and cache.has_target(fname) is False:
                no_target.append(fname.name)  # the scan found a 'mask' where no target
                continue
            with h5py.File(fname, "r") as hf:
                if "mask" not in hf:
                    no_mask.append(fname.name)
                elif key not in hf:
                    no_target.append(fname.name)
        if not no_mask:
            return
        where = f"the {stage} split ({folder})"
        if no_target:
            raise DataError(
                f"{where} mixes {len(no_target)} volume(s) without a target '{key}' "
                f"({_some(no_target)}), read with the 'mask' they store, and {len(no_mask)} "
                f"with a target but no 'mask' ({_some(no_mask)}), which only a mask function "
                "undersamples; a split is read one way: expected every volume with a target "
                "(undersampled with the mask function, test metrics) or every volume with a "
                "'mask' (fastMRI's test files). Move one kind to a split folder of its own, or give "
                "test_uses_stored_mask=False to undersample every volume with the mask function"
            )
        raise DataError(
            f"{where}: test_uses_stored_mask=True, but {len(no_mask)} volume(s) hold no 'mask' "
            f"({_some(no_mask)}); expected a 'mask' dataset in every volume (fastMRI's test "
            "files), or test_uses_stored_mask=None to undersample volumes with a target with "
            "the mask function"
        )

    def _check_mask_widths(self, stage: str, dataset: CheckedSliceDataset) -> None:
        """A fixed mask read from a file has one width: refuse, before any training, a split
        holding k-space of another width (fastMRI knee widths vary: 368, 372, ...), which
        would otherwise stop the run at the first such slice, maybe hours in."""
        mask_func = getattr(dataset.transform, "mask_func", None)
        if not isinstance(mask_func, FixedMaskFunc) or mask_func.base_mask_func is not None:
            return
        first_file: Dict[int, str] = {}
        for sample, (kspace, target) in zip(dataset.raw_samples, slice_shapes(dataset)):
            if self.kspace_from_target:  # k-space is computed from the target
                if not isinstance(target, tuple) or target[0] == "recon_size":
                    continue  # no target: the transform refuses the slice with its own words
                width = int(target[-1])
            else:
                width = int(kspace[-1])
            first_file.setdefault(width, str(sample[0]))
        for width, fname in first_file.items():
            try:
                mask_func.mask_for_width(width)
            except ValueError as err:
                where = f"the {stage} split ({self.split_folder(stage)})"
                if stage == "train" and self.combine_train_val:
                    where = (
                        f"the training data ({self.split_folder('train')} and, with "
                        f"combine_train_val, {self.split_folder('val')})"
                    )
                raise DataError(
                    f"{fname}: {err}; every volume of {where} must have k-space of the mask's "
                    f"width, widths found: {sorted(first_file)}"
                ) from None

    def setup(self, stage: Optional[str] = None) -> None:
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }
        for name in wanted.get(stage, ()) if stage else ("train", "val"):
            self.dataset(name)

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, stage: str) -> DataLoader:
        dataset = self.dataset(stage)
        training = stage == "train"
        sampler = None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.distributed_sampler and distributed:
            self._check_own_sharding(stage, dataset)
            sampler = (
                DistributedSampler(dataset, shuffle=True, seed=self.seed)
                if training
                else VolumeSampler(dataset, shuffle=False)
            )
        workers = dict(
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )
        shapes = self.batch_shapes(stage) if self.batch_size > 1 else None
        if shapes is not None and len(set(shapes)) > 1:
            # Volumes of several shapes (fastMRI knee widths, brain coil counts): batches of
            # one shape each, or the default collate fails on the first mixed batch.
            if sampler is None:
                sampler = RandomSampler(dataset) if training else SequentialSampler(dataset)
            rank_zero_info(
                f"{self.split_folder(stage)}: {len(set(shapes))} k-space shapes among "
                f"{len(shapes)} slices; each batch of {self.batch_size} takes slices of one shape"
            )
            batches = ShapeBatchSampler(sampler, self.batch_size, drop_last=False, shapes=shapes)
            return DataLoader(dataset, batch_sampler=batches, **workers)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=training and sampler is None,
            sampler=sampler,
            drop_last=False,
            **workers,
        )

    def _check_own_sharding(self, stage: str, dataset: CheckedSliceDataset) -> None:
        """``distributed_sampler=True`` shards the data itself: Lightning must not shard each
        rank's share again (slices were silently lost), and fastMRI's ``VolumeSampler`` needs
        a volume for every rank."""
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "FastMRIDataModule(distributed_sampler=True) shards the data itself; pair it "
                "with Trainer(use_distributed_sampler=False), or Lightning shards each rank's "
                "share again and slices are lost"
            )
        ranks = torch.distributed.get_world_size()
        volumes = len({str(sample[0]) for sample in dataset.raw_samples})
        if stage != "train" and volumes < ranks:
            raise ValueError(
                f"{self.split_folder(stage)}: {volumes} volume(s) for {ranks} ranks; "
                "distributed_sampler=True keeps each volume on one rank, so every rank needs "
                "one. Use fewer devices, or distributed_sampler=False (the metrics merge a "
                "volume's slices across ranks)"
            )

    def batch_shapes(self, stage: str) -> list:
        """Shape key of every slice of ``stage``'s dataset: slices with equal keys give
        samples that stack into one batch (see :class:`~sftkd_fastmri.data.ShapeBatchSampler`)."""
        shapes = slice_shapes(self.dataset(stage))
        if self.kspace_from_target:  # k-space is computed from the target: its shape decides
            return [target for _, target in shapes]
        return shapes

    # -- resuming -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Saved in Lightning checkpoints: how many training masks this process has drawn.

        With ``num_workers=0`` the training masks are seeded from a counter of this process,
        which a resumed run would otherwise start again from 0 (drawing the masks of the first
        epochs again). Workers (started afresh each epoch unless ``persistent_workers``) count
        from this process's value and are seeded from the torch generator, which
        :class:`~sftkd_fastmri.callbacks.RandomStateCheckpoint` saves."""
        dataset = self.datasets.get("train")
        transform = getattr(dataset, "transform", None)
        calls = getattr(transform, "_calls", self._pending_mask_calls)
        return {} if calls is None else {"train_mask_calls": int(calls)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Take the saved mask counter; applied to the training data when they are built.
        Lightning hands it back for test, validate and predict from a checkpoint too, which
        must not need (or scan) the training split."""
        calls = state_dict.get("train_mask_calls")
        if calls is None:
            return
        self._pending_mask_calls = int(calls)
        if "train" in self.datasets:
            self._apply_mask_calls(self.datasets["train"])

    def _apply_mask_calls(self, dataset: Any) -> None:
        transform = getattr(dataset, "transform", None)
        if self._pending_mask_calls is not None and hasattr(transform, "_calls"):
            transform._calls = self._pending_mask_calls
            self._pending_mask_calls = None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
