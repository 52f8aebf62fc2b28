"""Volume headers remembered between runs, so a split folder is scanned without opening files.

fastMRI's reader opens every volume of a split to read its ``ismrmrd_header`` before the first
batch (and :class:`~sftkd_fastmri.data.CheckedSliceDataset` checks its datasets there too):
on fastMRI's brain training split (4,469 volumes) on a network file system that is minutes
per run, and a study starts many runs. fastMRI's own answer, ``dataset_cache.pkl``, keys a
pickle by the folder alone: a file added, replaced or damaged later is never noticed, and a
pickle from elsewhere can run code when it is loaded.

:class:`HeaderCache` keeps one JSON file per split folder and challenge, holding for each
volume what the scan found (fastMRI's metadata and slice count, and whether it holds a target)
under the file's size, modification and change times and inode (of the file a link points
to), taken before it was read. A volume is read again whenever any of them changed, and a
volume first seen without its target checked is checked again when a split needs targets. Only
volumes that passed every check are remembered. The cache lives in
``$SFTKD_FASTMRI_CACHE_DIR``, else ``$XDG_CACHE_HOME/sftkd_fastmri``, else
``~/.cache/sftkd_fastmri``; a cache that cannot be read is ignored, one that cannot be written
costs a warning and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from .._io import atomic_write_text

__all__ = ["HeaderCache", "cache_dir", "file_key"]

#: Bumped when what an entry means changes; entries of another version are not read.
VERSION = 2  # 2: the scan refuses empty target axes (entries of 1 predate it)


def cache_dir() -> Path:
    """Where the package keeps its caches (see the module docstring).

    Raises:
        RuntimeError: If none is set and there is no home folder (a container run under a
            user id without one); :class:`HeaderCache` then caches nothing.
    """
    explicit = os.environ.get("SFTKD_FASTMRI_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "sftkd_fastmri"


class _Unstorable(TypeError):
    """A metadata value JSON cannot carry exactly (the volume is then not remembered)."""


def _encode(value: Any) -> Any:
    """JSON form of a metadata value that decodes to an equal value of the same type."""
    if value is None or type(value) in (bool, int, float, str):  # not their numpy kin
        return value
    if isinstance(value, (np.generic, np.ndarray)) and not _exact(value.dtype):
        raise _Unstorable(f"{value.dtype}")  # e.g. long double: no exact JSON number
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return {"numpy": value.dtype.str, "value": value.item()}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.size <= 4096:
        return {"ndarray": value.dtype.str, "shape": list(value.shape), "value": value.tolist()}
    if isinstance(value, np.str_):
        return {"numpy": "str", "value": str(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    raise _Unstorable(f"{type(value).__name__}")


def _exact(dtype: np.dtype) -> bool:
    """Whether JSON carries this dtype's numbers exactly (booleans, integers, floats up to
    64 bits; strings are handled apart)."""
    return dtype.kind in "biuf" and dtype.itemsize <= 8 or dtype.kind == "U"


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode(v) for v in value["tuple"])
        if "ndarray" in value:
            array = np.array(value["value"], dtype=np.dtype(value["ndarray"]))
            return array.reshape(value["shape"])
        if value.get("numpy") == "str":
            return np.str_(value["value"])
        return np.dtype(value["numpy"]).type(value["value"])
    return value


def file_key(fname: Path) -> list:
    """What identifies a file's version: size, modification and change times, inode (of the
    file a link points to). The change time catches an edit whose modification time was
    set back (``touch -r``, ``rsync --inplace``) and a change of permissions."""
    stat = fname.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


class HeaderCache:
    """What the scan of one split folder found, per volume (see the module docstring).

    Args:
        folder: The split folder.
        challenge: ``"singlecoil"`` or ``"multicoil"`` (a folder read as either is cached
            apart).
        directory: Where the cache files go (default: :func:`cache_dir`).
    """

    def __init__(
        self,
        folder: Union[str, os.PathLike],
        challenge: str,
        directory: Optional[Union[str, os.PathLike]] = None,
    ):
        self.folder = str(Path(folder).resolve())
        self.challenge = challenge
        digest = hashlib.sha256(f"{self.folder}\0{challenge}".encode()).hexdigest()[:24]
        self.path: Optional[Path] = None
        try:
            self.path = Path(directory or cache_dir()) / "headers" / f"{digest}.json"
        except RuntimeError as err:  # no home folder, and no cache folder given
            warnings.warn(
                f"no header cache ({err}); set SFTKD_FASTMRI_CACHE_DIR to a writable folder "
                "to keep the volume headers between runs",
                stacklevel=3,
            )
        self._old: Dict[str, Any] = self._read()
        self._seen: Dict[str, Any] = {}

    def _read(self) -> Dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if (
            not isinstance(data, dict)
            or data.get("version") != VERSION
            or data.get("folder") != self.folder
            or data.get("challenge") != self.challenge
            or not isinstance(data.get("volumes"), dict)
        ):
            return {}
        return data["volumes"]

    def _unchanged(self, fname: Path) -> Optional[Dict[str, Any]]:
        """The remembered entry of ``fname`` if the file is unchanged since, else ``None``."""
        entry = self._old.get(Path(fname).name)
        try:
            if isinstance(entry, dict) and entry.get("file") == file_key(Path(fname)):
                return entry
        except OSError:
            pass
        return None

    def lookup(self, fname: Path, require_target: bool) -> Optional[Tuple[Dict[str, Any], int]]:
        """``(metadata, num_slices)`` remembered for ``fname`` if the file is unchanged (and
        was checked with its target when ``require_target``), else ``None``."""
        entry = self._unchanged(fname)
        if entry is None or (require_target and not entry.get("target")):
            return None
        try:
            found = (
                {k: _decode(v) for k, v in entry["metadata"].items()},
                int(entry["num_slices"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        self._seen[Path(fname).name] = entry
        return found

    def has_target(self, fname: Path) -> Optional[bool]:
        """Whether the remembered scan found a checked target in ``fname``; ``None`` if the
        file is not remembered or changed since."""
        entry = self._unchanged(fname)
        return None if entry is None else bool(entry.get("target"))

    def store(
        self,
        fname: Path,
        key: list,
        metadata: Dict[str, Any],
        num_slices: int,
        has_target: bool,
    ) -> None:
        """Remember a volume that passed its checks, under the :func:`file_key` taken before
        it was read (so a change while it was read makes the next scan read it again; one
        that changed is not remembered at all). Skipped if its metadata hold a value JSON
        cannot carry exactly."""
        try:
            if file_key(Path(fname)) != key:
                return
            entry = {
                "file": list(key),
                "num_slices": int(num_slices),
                "target": bool(has_target),
                "metadata": {str(k): _encode(v) for k, v in metadata.items()},
            }
        except (_Unstorable, OSError):
            return
        self._seen[Path(fname).name] = entry

    def save(self) -> None:
        """Write what this scan found (volumes gone from the folder are dropped), unless it is
        what the cache held already."""
        if self.path is None or self._seen == self._old:
            return
        try:
            text = json.dumps(
                {
                    "version": VERSION,
                    "folder": self.folder,
                    "challenge": self.challenge,
                    "volumes": self._seen,
                }
            )
        except (TypeError, ValueError):  # a value _encode let through: cache nothing
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, text)
        except OSError as err:
            warnings.warn(
                f"could not write the header cache {self.path} ({err}); the next run reads "
                "the volume headers again (set SFTKD_FASTMRI_CACHE_DIR to a writable folder, "
                "or turn the cache off with dataset_cache false)",
                stacklevel=2,
            )
        self._old = dict(self._seen)
