"""Hold out part of a fastMRI split as a test split that checkpoint selection never sees.

fastMRI's public ``*_test`` folders carry no targets, so a study that selects checkpoints on
``*_val`` and also reports on ``*_val`` reports optimistic numbers (the SFT-KD-Recon authors
did that). :func:`holdout_split` divides the volumes of one split folder, by volume and
deterministically from a seed, into two new folders of links (or copies) next to it::

    knee/singlecoil_val/            199 volumes (left as it is)
    knee/singlecoil_val_select/     ~80 %: pass as --val-split val_select
    knee/singlecoil_test_heldout/   ~20 %: pass as --test-split test_heldout

Both folders and a ``holdout_{challenge}_{test_name}.json`` manifest in the parent folder are
written under temporary names and renamed into place together when complete, so an interrupted
call leaves no half-filled split behind and the manifest always describes the folders.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Set, Tuple, Union

import h5py
import numpy as np
from tqdm.auto import tqdm

from .._io import make_temp_dir, swap_in, write_temp_text
from .datasets import TARGET_KEYS, check_volume, split_dir
from .transforms import DataError

__all__ = ["HoldoutSplit", "holdout_split"]


@dataclass
class HoldoutSplit:
    """What :func:`holdout_split` wrote.

    Attributes:
        source: The split folder that was divided.
        select_dir: Folder of the volumes kept for validation / checkpoint selection.
        test_dir: Folder of the held-out test volumes.
        select: File names in ``select_dir``.
        test: File names in ``test_dir``.
        seed: Seed of the draw.
        fraction: Requested held-out fraction.
        mode: ``"link"`` (symbolic links) or ``"copy"``.
    """

    source: str
    select_dir: str
    test_dir: str
    select: List[str]
    test: List[str]
    seed: int
    fraction: float
    mode: str


def holdout_split(
    root: Union[str, os.PathLike],
    challenge: str,
    *,
    source: str = "val",
    fraction: float = 0.2,
    seed: int = 0,
    select_name: str = "val_select",
    test_name: str = "test_heldout",
    mode: str = "link",
    overwrite: bool = False,
    progress: bool = True,
) -> HoldoutSplit:
    """Divide the volumes of ``root/{challenge}_{source}`` into a selection and a test split.

    Volumes (never slices) are drawn without replacement with ``numpy``'s generator seeded by
    ``seed``: ``round(fraction * n)`` of them, at least one, go to the test split and the rest
    to the selection split. The source folder is not modified. Files that are not HDF5 are
    left out with an error, so a stray file cannot silently end up in one split.

    Args:
        root: Folder holding fastMRI's split folders (e.g. ``.../knee``).
        challenge: ``"singlecoil"`` or ``"multicoil"``.
        source: Split to divide (default ``"val"``).
        fraction: Fraction of the volumes to hold out, in ``(0, 1)``.
        seed: Seed of the draw.
        select_name: Split name of the remaining volumes.
        test_name: Split name of the held-out volumes.
        mode: ``"link"`` (symbolic links to the source files, no extra disk) or ``"copy"``.
        overwrite: Replace existing target folders; only folders an earlier call wrote (named
            by a ``holdout_{challenge}_*.json`` manifest in ``root``, holding only the files
            it lists, and not holding the source's data) are replaced, never another split.
        progress: Show a progress bar while copying (``mode="copy"``; links are instant).

    Returns:
        :class:`HoldoutSplit` (also written to ``root/holdout_{challenge}_{test_name}.json``).

    Raises:
        FileNotFoundError: The source folder does not exist.
        DataError: An entry of the source folder is not an HDF5 volume (hidden files are
            skipped: they never reach the new folders), a volume is damaged or has no target,
            or there are fewer than two volumes.
        FileExistsError: A target folder exists and ``overwrite`` is false, or it is not a
            folder an earlier call wrote (then never replaced).
        ValueError: Bad ``fraction``, ``mode`` or split names.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if mode not in ("link", "copy"):
        raise ValueError(f"mode must be 'link' or 'copy', got {mode!r}")
    for option, name in (
        ("source", source),
        ("select_name", select_name),
        ("test_name", test_name),
    ):
        # a split name becomes a folder name beside the others: no paths, no hidden names
        if (
            not isinstance(name, str)
            or not name
            or "/" in name
            or os.sep in name
            or name.startswith(".")
            or name != name.strip()
        ):
            raise ValueError(
                f"{option} must be a plain split name such as 'val' or 'test_heldout' (the "
                f"folder {challenge}_<name>), got {name!r}"
            )
    if len({source, select_name, test_name}) != 3:
        raise ValueError(
            f"source, select_name and test_name must differ, got {source!r}, {select_name!r}, "
            f"{test_name!r}"
        )
    src = split_dir(root, challenge, source)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such split folder (expected {challenge}_{source})")
    # Hidden files (a .DS_Store) are no volumes and never reach the two new folders, which are
    # what the reader reads; the source folder is left as it is.
    files = sorted(p for p in src.iterdir() if not p.name.startswith("."))
    bad = [p.name for p in files if not (p.is_file() and h5py.is_hdf5(p))]
    if bad:
        raise DataError(
            f"{src}: not HDF5 volumes: {bad[:5]}{' ...' if len(bad) > 5 else ''}; every entry "
            "of a fastMRI split folder must be an .h5 volume (move other files elsewhere)"
        )
    key = TARGET_KEYS[challenge]
    untargeted = []
    for path in files:
        # what the reader would refuse (missing keys, wrong layouts, a damaged file) is
        # refused here, before anything is written
        check_volume(path, challenge, require_target=False)
        with h5py.File(path, "r") as hf:
            if key not in hf:
                untargeted.append(path.name)
    if untargeted:
        raise DataError(
            f"{src}: {len(untargeted)} of {len(files)} volumes have no target ('{key}'), e.g. "
            f"{untargeted[0]} (fastMRI's public test files carry none); a held-out split is "
            f"scored and a selection split validated against targets: divide a split with "
            f"targets (--source val, or train)"
        )
    if len(files) < 2:
        raise DataError(f"{src}: {len(files)} volume(s); holding one out needs at least 2")
    n_test = min(len(files) - 1, max(1, int(round(fraction * len(files)))))
    order = np.random.default_rng(seed).permutation(len(files))
    test_idx = set(order[:n_test].tolist())
    test = [f for i, f in enumerate(files) if i in test_idx]
    select = [f for i, f in enumerate(files) if i not in test_idx]

    targets = {
        select_name: (split_dir(root, challenge, select_name), select),
        test_name: (split_dir(root, challenge, test_name), test),
    }
    for dest, _ in targets.values():
        if dest.exists() or dest.is_symlink():
            if not overwrite:
                raise FileExistsError(
                    f"{dest} exists; pass --overwrite (overwrite=True in Python) to replace it "
                    f"(only a folder an earlier holdout-split wrote is replaced)"
                )
            _check_replaceable(Path(root), challenge, dest, src, files)
    result = HoldoutSplit(
        source=str(src),
        select_dir=str(targets[select_name][0]),
        test_dir=str(targets[test_name][0]),
        select=[f.name for f in select],
        test=[f.name for f in test],
        seed=int(seed),
        fraction=float(fraction),
        mode=mode,
    )
    # Both folders are filled under temporary names first and renamed into place together
    # at the end: an interruption never leaves a new selection split beside an old test
    # split (which could share volumes with it). The manifest is renamed in with them, so it
    # never describes folders that were not (or not yet) swapped in.
    manifest = Path(root) / f"holdout_{challenge}_{test_name}.json"
    filled: List[Tuple[Path, Path]] = []
    try:
        with tqdm(
            total=len(files),
            desc="copying volumes",
            unit="volume",
            disable=not progress or mode != "copy",
        ) as bar:
            for dest, members in targets.values():
                filled.append((_fill_folder(dest, members, mode, bar.update), dest))
        filled.append(
            (write_temp_text(manifest, json.dumps(asdict(result), indent=2) + "\n"), manifest)
        )
        swap_in(filled, "holdout-split", "split folders")
    finally:
        for tmp, _ in filled:
            _remove(tmp)  # those not renamed into place
    return result


def _written_folders(root: Path, challenge: str) -> Dict[str, Set[str]]:
    """Folder name -> file names, for every split folder an earlier :func:`holdout_split`
    wrote under ``root`` (read from its ``holdout_{challenge}_*.json`` manifests; folders are
    matched by name, so a moved data folder keeps its manifests valid)."""
    written: Dict[str, Set[str]] = {}
    for manifest in sorted(root.glob(f"holdout_{challenge}_*.json")):
        try:
            record = json.loads(manifest.read_text())
            pairs = ((record["select_dir"], record["select"]), (record["test_dir"], record["test"]))
            for folder, names in pairs:
                written.setdefault(Path(folder).name, set()).update(str(n) for n in names)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a manifest of this function: it vouches for nothing
    return written


def _check_replaceable(
    root: Path, challenge: str, dest: Path, src: Path, files: List[Path]
) -> None:
    """Refuse to replace ``dest`` unless it is a folder an earlier holdout-split wrote,
    holding nothing else, and none of the source's volumes lives in it (a source of links
    into ``dest`` would lose its data with it)."""
    written = _written_folders(root, challenge)
    if dest.is_symlink() or not dest.is_dir() or dest.name not in written:
        raise FileExistsError(
            f"{dest} exists and is not a split folder an earlier holdout-split wrote (no "
            f"holdout_{challenge}_*.json manifest in {root} names it); --overwrite replaces "
            f"only such folders: choose other names with --select-name / --test-name, or move "
            f"{dest.name} away yourself"
        )
    foreign = sorted(
        p.name
        for p in dest.iterdir()
        if not p.name.startswith(".") and p.name not in written[dest.name]
    )
    if foreign:
        raise FileExistsError(
            f"{dest} holds entries the earlier holdout-split did not write: "
            f"{foreign[:5]}{' ...' if len(foreign) > 5 else ''}; --overwrite would delete "
            f"them: move them away first, or choose other names with --select-name / "
            f"--test-name"
        )
    real_dest = dest.resolve()
    inside = [
        f.name
        for f in [src, *files]
        if f.resolve() == real_dest or real_dest in f.resolve().parents
    ]
    if inside:
        raise FileExistsError(
            f"{dest} holds the data of the source {src} ({inside[:3]}"
            f"{' ...' if len(inside) > 3 else ''} resolve into it); replacing it would delete "
            f"them: choose other names with --select-name / --test-name"
        )


def _remove(path: Path) -> None:
    """Remove a file, link or folder if it is there (errors ignored)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _fill_folder(
    dest: Path, members: List[Path], mode: str, done: Callable[[int], object] = lambda n: None
) -> Path:
    """A temporary sibling of ``dest`` holding ``members`` (links or copies); ``done(1)`` is
    called after each member."""
    tmp = make_temp_dir(dest.parent, f".{dest.name}.")
    try:
        for f in members:
            if mode == "link":
                # Relative links: the folder can be moved or mounted elsewhere as a whole.
                os.symlink(os.path.relpath(os.path.abspath(f), os.path.abspath(dest)), tmp / f.name)
            else:
                shutil.copy2(f, tmp / f.name)
            done(1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp
