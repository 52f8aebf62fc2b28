"""File writing shared by every layer: whole files or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Union

import numpy as np

__all__ = ["atomic_write_text", "save_reconstructions_atomic"]


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``, so an
    interrupted write never leaves a half-written file (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        save_reconstructions(dict(reconstructions), staging)
        for fname in reconstructions:
            os.replace(staging / fname, out_dir / fname)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
