"""fastMRI's :class:`~fastmri.data.SliceDataset` with input checks that name file and key.

fastMRI's reader iterates every entry of a split folder; a stray non-HDF5 file or a volume
without ``kspace`` fails deep inside h5py or lxml. :class:`CheckedSliceDataset` is the same
reader (subclass, no copy) that checks each file first and reports what is wrong with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import h5py
import numpy as np
from fastmri.data import SliceDataset

from .header_cache import HeaderCache, file_key
from .transforms import DataError

__all__ = ["CheckedSliceDataset", "check_split_entries", "check_volume", "split_dir", "TARGET_KEYS"]

TARGET_KEYS = {"singlecoil": "reconstruction_esc", "multicoil": "reconstruction_rss"}


def split_dir(root: Union[str, os.PathLike], challenge: str, split: str) -> Path:
    """``root/{challenge}_{split}``, fastMRI's folder convention."""
    if challenge not in TARGET_KEYS:
        raise ValueError(f"challenge must be 'singlecoil' or 'multicoil', got {challenge!r}")
    return Path(root) / f"{challenge}_{split}"


def missing_split_hint(folder: Union[str, os.PathLike]) -> str:
    """For a split folder that does not exist: the split folders its data folder holds
    (another challenge's, or other split names), as a hint to append to the error."""
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return ""
    splits = sorted(
        p.name for p in parent.iterdir() if p.is_dir() and p.name.split("_")[0] in TARGET_KEYS
    )
    if not splits:
        return ""
    challenges = sorted({name.split("_")[0] for name in splits})
    wanted = folder.name.split("_")[0]
    other = f"; another --challenge ({', '.join(challenges)})?" if wanted not in challenges else ""
    shown = ", ".join(splits[:8]) + (" ..." if len(splits) > 8 else "")
    return f" (its data folder holds {shown}{other})"


def check_split_entries(folder: Union[str, os.PathLike]) -> None:
    """Raise :class:`DataError` unless ``folder`` is a split folder whose every entry is an
    HDF5 file: the checks of :func:`check_volume` that need no more than each file's first
    bytes, so a command can make them before it changes anything on disk."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist{missing_split_hint(folder)}")
    for fname in sorted(folder.iterdir()):
        _check_entry(fname)


def check_volume(fname: Path, challenge: str, require_target: bool) -> bool:
    """Raise :class:`DataError` unless ``fname`` is a readable fastMRI volume; return whether
    it holds a (checked) target."""
    _check_entry(fname)
    try:
        hf = h5py.File(fname, "r")
    except OSError as err:  # truncated or damaged files: h5py's own words, with the name
        raise DataError(
            f"{fname}: unreadable HDF5 file ({err}); a copy or download that was cut short? "
            "Replace or remove it"
        ) from None
    with hf:
        return _check_open_volume(hf, fname, challenge, require_target)


def _check_entry(fname: Path) -> None:
    """An entry of a split folder is a (reachable) HDF5 file."""
    if fname.is_dir():
        raise DataError(
            f"{fname}: a folder inside a split folder; fastMRI's reader takes every entry of a "
            "split folder as a .h5 volume (move the folder elsewhere)"
        )
    if fname.is_symlink() and not fname.exists():
        raise DataError(
            f"{fname}: a broken link (it points to {os.readlink(fname)}, which does not exist); "
            "was the data folder it points into moved? Recreate the split (e.g. "
            "sftkd-fastmri holdout-split ... --overwrite) or remove the link"
        )
    if not h5py.is_hdf5(fname):
        raise DataError(
            f"{fname}: not an HDF5 file; every entry of a fastMRI split folder must be a "
            ".h5 volume (move other files elsewhere)"
        )


def _check_open_volume(hf: h5py.File, fname: Path, challenge: str, require_target: bool) -> bool:
    for key in ("kspace", "ismrmrd_header"):
        if key not in hf:
            raise DataError(f"{fname}: missing dataset '{key}'")
        if not isinstance(hf[key], h5py.Dataset):
            raise DataError(f"{fname}: '{key}' is an HDF5 group; expected a dataset")
    if not np.issubdtype(hf["kspace"].dtype, np.complexfloating):
        raise DataError(
            f"{fname}: 'kspace' has dtype {hf['kspace'].dtype}; fastMRI k-space is complex "
            "(complex64)"
        )
    ndim = 3 if challenge == "singlecoil" else 4
    if hf["kspace"].ndim != ndim:
        layout = "(slices, H, W)" if ndim == 3 else "(slices, coils, H, W)"
        raise DataError(
            f"{fname}: 'kspace' has shape {hf['kspace'].shape}; {challenge} data must be {layout}"
        )
    if 0 in hf["kspace"].shape[1:]:
        raise DataError(
            f"{fname}: 'kspace' has shape {hf['kspace'].shape}; every axis after the slices "
            "must be non-empty"
        )
    target_key = TARGET_KEYS[challenge]
    if require_target or target_key in hf:  # a target present is checked all the same
        if target_key not in hf:
            raise DataError(f"{fname}: missing target dataset '{target_key}'")
        if not isinstance(hf[target_key], h5py.Dataset) or hf[target_key].ndim != 3:
            raise DataError(
                f"{fname}: '{target_key}' must be a (slices, H, W) dataset, got "
                f"{getattr(hf[target_key], 'shape', 'a group')}"
            )
        if 0 in hf[target_key].shape[1:]:
            raise DataError(
                f"{fname}: '{target_key}' has shape {hf[target_key].shape}; its image axes "
                "(H, W) must be non-empty"
            )
        if hf[target_key].shape[0] != hf["kspace"].shape[0]:
            raise DataError(
                f"{fname}: '{target_key}' has {hf[target_key].shape[0]} slices, 'kspace' "
                f"has {hf['kspace'].shape[0]}"
            )
        if np.issubdtype(hf[target_key].dtype, np.complexfloating):
            raise DataError(f"{fname}: '{target_key}' is complex; expected magnitude images")
        if "max" not in hf.attrs:
            raise DataError(f"{fname}: missing attribute 'max' (the target volume maximum)")
        try:
            max_value = float(hf.attrs["max"])
        except (TypeError, ValueError):
            max_value = float("nan")
        if not (np.isfinite(max_value) and max_value > 0):
            raise DataError(
                f"{fname}: attribute 'max' is {hf.attrs['max']!r}; expected the target "
                "volume's maximum, a finite number > 0 (PSNR and SSIM use it as data range)"
            )
        return True
    if "mask" not in hf:
        raise DataError(
            f"{fname}: has neither a target '{target_key}' nor a 'mask' dataset; cannot evaluate it"
        )
    return False


def check_recon_size(fname: Path, metadata: dict) -> None:
    """Raise :class:`DataError` unless the header's reconSpace matrix (fastMRI's
    ``recon_size``, the crop of a volume without target) is at least 1 x 1."""
    recon_size = metadata.get("recon_size")
    if recon_size is None:
        return
    if not all(int(n) > 0 for n in tuple(recon_size)[:2]):
        raise DataError(
            f"{fname}: 'ismrmrd_header' gives encoding/reconSpace/matrixSize (x, y) = "
            f"({recon_size[0]}, {recon_size[1]}); fastMRI crops the output to it, so both "
            "must be > 0"
        )


def keep_every_slice(raw_sample) -> bool:
    """Default slice filter (a module-level function, so datasets pickle for DDP spawn and
    spawn-started DataLoader workers; fastMRI's default is a lambda)."""
    return True


def _naming_the_place(err: Exception, where: str) -> Exception:
    """``err`` anew with ``where`` (file and slice) before its message: of the same type
    where that type is built from a message alone, else a :class:`RuntimeError` naming it."""
    message = f"{where}: {err}"
    try:
        named = type(err)(message)
    except Exception:
        named = None
    if named is None or str(named) != message:
        named = RuntimeError(f"{where}: {type(err).__name__}: {err}")
    return named


class EmptySubsetError(DataError):
    """A sample rate that keeps no slice of a folder holding volumes."""


class CheckedSliceDataset(SliceDataset):
    """:class:`fastmri.data.SliceDataset` that checks every volume before reading it.

    Args:
        root: split folder, e.g. ``knee/singlecoil_train``.
        challenge: ``"singlecoil"`` or ``"multicoil"``.
        transform: fastMRI-style transform (e.g. :class:`DCCNNDataTransform`).
        require_target: every volume must hold a target (training and validation).
        header_cache: remember each volume's header and checks between runs
            (:class:`~sftkd_fastmri.data.header_cache.HeaderCache`), so an unchanged volume is
            not opened by the scan; off by default, as fastMRI's ``use_dataset_cache``
            (:class:`~sftkd_fastmri.pl_modules.FastMRIDataModule` turns it on).
        **kwargs: passed to :class:`fastmri.data.SliceDataset` (``sample_rate``, ...).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        challenge: str,
        transform: Optional[Callable] = None,
        require_target: bool = True,
        header_cache: bool = False,
        **kwargs,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist{missing_split_hint(root)}")
        self._challenge = challenge
        self._require_target = require_target
        kwargs.setdefault("raw_sample_filter", keep_every_slice)
        cache = HeaderCache(root, challenge) if header_cache else None
        self._header_cache = cache
        try:
            super().__init__(root, challenge, transform=transform, **kwargs)
        finally:
            self._header_cache = None  # not pickled into DataLoader workers
        if cache is not None:
            cache.save()  # the whole folder was scanned: remember it
        if len(self.raw_samples) == 0:
            rates = {
                k: kwargs[k]
                for k in ("sample_rate", "volume_sample_rate")
                if kwargs.get(k) not in (None, 1.0)
            }
            volumes = sum(1 for _ in root.iterdir())
            if rates and volumes:
                given = ", ".join(f"{k}={v}" for k, v in rates.items())
                raise EmptySubsetError(
                    f"data folder {root}: {given} keeps no slices of its {volumes} volume(s) "
                    "(fastMRI keeps round(rate x count)); raise the rate"
                )
            raise DataError(f"data folder {root} holds no slices")

    def __getitem__(self, i: int):
        """fastMRI's slice, with every error from reading or transforming it naming the file's
        path and the slice (fastMRI hands transforms the file name alone); the original error
        is chained. Data errors are :class:`DataError`; others (e.g. torch's
        ``RuntimeError``) keep their type."""
        fname, dataslice = self.raw_samples[i][0], self.raw_samples[i][1]
        try:
            return super().__getitem__(i)
        except DataError as err:
            message = str(err)
            name = Path(fname).name
            if message.startswith(name):
                message = str(fname) + message[len(name) :]
            raise DataError(message) from err
        except (OSError, KeyError) as err:  # a file changed or damaged since the scan
            raise DataError(f"{fname} slice {dataslice}: cannot read it: {err}") from err
        except ValueError as err:  # e.g. a fixed mask of another width than this volume
            raise DataError(f"{fname} slice {dataslice}: {err}") from err
        except Exception as err:  # e.g. torch's RuntimeError: the type kept, the place named
            raise _naming_the_place(err, f"{fname} slice {dataslice}") from err

    def _retrieve_metadata(self, fname):
        cache = getattr(self, "_header_cache", None)
        key = None
        if cache is not None:
            found = cache.lookup(Path(fname), self._require_target)
            if found is not None:
                check_recon_size(Path(fname), found[0])  # entries of before this check
                return found
            try:
                key = file_key(Path(fname))  # before reading: a change while reading shows
            except OSError:
                key = None  # check_volume names what is wrong with the entry
        has_target = check_volume(Path(fname), self._challenge, self._require_target)
        try:
            metadata, num_slices = super()._retrieve_metadata(fname)
        except Exception as err:
            raise DataError(
                f"{fname}: cannot parse 'ismrmrd_header' (fastMRI needs encoding/encodedSpace, "
                f"reconSpace and encodingLimits/kspace_encoding_step_1): {err}"
            ) from err
        check_recon_size(Path(fname), metadata)
        if cache is not None and key is not None:
            cache.store(Path(fname), key, metadata, num_slices, has_target)
        return metadata, num_slices
