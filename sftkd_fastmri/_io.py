"""File writing shared by every layer: whole files or nothing."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import List, Mapping, Tuple, Union

import numpy as np

__all__ = [
    "atomic_write_text",
    "atomic_write_texts",
    "swap_in",
    "make_temp_dir",
    "make_temp_file",
    "remove_stale_temporaries",
    "save_reconstructions_atomic",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner() -> str:
    """``<host>-<pid>``: which process a temporary name belongs to (no dots in it)."""
    host = socket.gethostname().replace(".", "_").replace(os.sep, "_") or "host"
    return f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or cannot tell: keep its files
    return True


def remove_stale_temporaries(parent: Union[str, os.PathLike], prefix: str) -> None:
    """Remove temporaries named ``<prefix><host>-<pid>.*`` in ``parent`` whose process, on
    this host, is gone: what a killed process (SIGKILL, power loss) could not clean up.
    Those of live processes and of other hosts (a shared file system) stay."""
    host = _owner().rsplit("-", 1)[0]
    try:
        candidates = list(Path(parent).glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return
    for path in candidates:
        owner = path.name[len(prefix) :].split(".", 1)[0]
        name_host, _, pid = owner.rpartition("-")
        if name_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            pass  # removed meanwhile, or not ours to remove


def _temp_stem(name: str) -> str:
    """``name`` as a temporary's name holds it: shortened (with a hash of the whole) when
    long, so that the host, pid and random part added to it keep the name within the 255
    bytes file systems allow, for any name the output itself may have."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= _STEM_BYTES:
        return name
    head = raw[: _STEM_BYTES - 12].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha1(raw).hexdigest()[:10]}"


_STEM_BYTES = 100


def make_temp_file(path: Union[str, os.PathLike], suffix: str = ".tmp") -> Path:
    """An empty temporary file beside ``path`` (a hidden name, unique), to be renamed onto
    ``path`` once written. ``tempfile.mkstemp`` makes files private (0600); this one gets the
    permissions a plain ``open()`` would give (0666 minus the umask), so a renamed output is as
    readable as any other file the user writes. The name holds the host and process id, so
    the next write of ``path`` removes what a killed process left
    (:func:`remove_stale_temporaries`)."""
    path = Path(path)
    stem = _temp_stem(path.name)
    remove_stale_temporaries(path.parent, f".{stem}.")
    prefix = f".{stem}.{_owner()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def make_temp_dir(parent: Union[str, os.PathLike], prefix: str) -> Path:
    """A temporary folder in ``parent`` with the permissions ``mkdir`` would give (0777 minus
    the umask; ``tempfile.mkdtemp`` makes it private); named with the host and process id
    like :func:`make_temp_file`, and the stale ones of killed processes removed first."""
    remove_stale_temporaries(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{_owner()}.", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    return Path(tmp)


def write_temp_text(path: Union[str, os.PathLike], text: str) -> Path:
    """A temporary file beside ``path`` (:func:`make_temp_file`) holding ``text``, for the
    caller to rename onto ``path``; removed again if writing fails."""
    tmp = make_temp_file(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_texts(texts: Mapping[Union[str, os.PathLike], str]) -> None:
    """Write several text files as one: every text goes to a temporary file first, and only
    when all are written are they renamed into place (one after another, within
    microseconds); a failure before that leaves every earlier file as it was."""
    temps = []
    try:
        for path, text in texts.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            temps.append((write_temp_text(path, text), Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)  # a file renamed into place is gone from here


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``, so an
    interrupted write never leaves a half-written file (parent folders are created)."""
    atomic_write_texts({path: text})


def save_reconstructions_atomic(
    reconstructions: Mapping[str, np.ndarray], out_dir: Union[str, os.PathLike]
) -> Path:
    """:func:`fastmri.save_reconstructions` (``out_dir/<fname>``, dataset ``reconstruction``),
    written into a temporary folder inside ``out_dir`` and renamed into place file by file, so
    an interrupted write leaves every file either whole (old or new) or absent, never
    half-written.

    Returns:
        ``out_dir``.
    """
    from fastmri import save_reconstructions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(out_dir, ".partial-")
    try:
        save_reconstructions(dict(reconstructions), staging)
        for fname in reconstructions:
            os.replace(staging / fname, out_dir / fname)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def swap_in(filled: List[Tuple[Path, Path]], command: str, what: str) -> None:
    """Rename each filled temporary folder (or file) onto its destination, all or none: the
    old destinations (folders, links, files) are first renamed aside (quick, unlike deleting
    a copied split), then the new ones renamed in; on any failure the new ones are taken out
    again and the old ones put back, so the destinations never mix two results. Should
    putting them back fail too, the old ones are kept under visible names the error gives
    (``command`` and ``what`` name them there). The caller removes temporaries left over."""
    aside: List[Tuple[Path, Path]] = []  # (holder folder, destination)
    placed: List[Tuple[Path, Path]] = []  # (temporary, destination)
    try:
        for _, dest in filled:
            if dest.exists() or dest.is_symlink():
                holder = make_temp_dir(dest.parent, f".{_temp_stem(dest.name)}.")
                try:
                    os.replace(dest, holder / dest.name)
                except BaseException:
                    shutil.rmtree(holder, ignore_errors=True)  # still empty
                    raise
                aside.append((holder, dest))
        for tmp, dest in filled:
            os.replace(tmp, dest)
            placed.append((tmp, dest))
    except BaseException as err:
        _roll_back(aside, placed, err, command, what)
        raise
    for holder, _ in aside:
        shutil.rmtree(holder, ignore_errors=True)


def _roll_back(
    aside: List[Tuple[Path, Path]],
    placed: List[Tuple[Path, Path]],
    err: BaseException,
    command: str,
    what: str,
) -> None:
    """Undo a partial :func:`swap_in`; its holders are removed only once emptied."""
    try:
        for tmp, dest in placed:  # back to its temporary name (removed by the caller)
            os.replace(dest, tmp)
        while aside:
            holder, dest = aside[0]
            os.replace(holder / dest.name, dest)
            shutil.rmtree(holder, ignore_errors=True)
            aside.pop(0)
    except BaseException as again:
        kept = []
        for holder, dest in aside:  # out of the hidden holders a later run would remove
            visible = dest.with_name(f"{dest.name}.before-{command}-{os.getpid()}")
            try:
                os.replace(holder / dest.name, visible)
                shutil.rmtree(holder, ignore_errors=True)
                kept.append(str(visible))
            except OSError:
                kept.append(str(holder / dest.name))
        raise OSError(
            f"{command} failed ({type(err).__name__}: {err}) and could not put the "
            f"earlier {what} back ({type(again).__name__}: {again}); they are kept "
            f"as {', '.join(kept)}: rename them back, or run {command} again"
        ) from err
