"""CPU training speed: keep freed memory in the process (glibc ``malloc`` settings).

A training step on the CPU allocates and frees activations of tens of MiB each. glibc serves
blocks that large with ``mmap`` and unmaps them on ``free``, and it returns the top of the heap
to the system beyond 128 KiB, so every step page-faults its working set back in: measured with
``benchmarks/bench_sft.py`` on a 2-core machine (D5C5 / D3C5, 320 x 320, batch 4), a teacher
training step took 2.62 s and an SFT step 8.2 s with the defaults, 1.86 s and 3.59 s with
:func:`retain_freed_memory`. The price: the process keeps its peak heap until it exits, as a
training process does anyway.

The command line calls :func:`retain_freed_memory` when no CUDA device is present (set
``SFTKD_FASTMRI_MALLOC=default`` to keep glibc's defaults); in Python, call it once before
training. Elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["retain_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_applied = False


def retain_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it (glibc ``mallopt``).

    Sets ``M_MMAP_THRESHOLD`` to 2 GiB (tensors up to that size come from the heap and are
    reused after ``free``), disables trimming (``M_TRIM_THRESHOLD``) and pads heap growth by
    1 GiB (``M_TOP_PAD``). Idempotent.

    Returns:
        ``True`` if the settings are in effect, ``False`` where they are not available (not
        glibc) or ``SFTKD_FASTMRI_MALLOC=default`` is set.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("SFTKD_FASTMRI_MALLOC", "").lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(-1)) == 1  # -1: as size_t, never trim
    ok &= libc.mallopt(_M_TOP_PAD, ctypes.c_int(2**30)) == 1
    _applied = bool(ok)
    return _applied
