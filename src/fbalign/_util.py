"""Small helpers shared by the configuration, models and data modules."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any


def check_options(factory: Callable[..., Any], options: dict[str, Any], what: str,
                  supplied: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the valid options when ``factory`` does not accept ``options``.

    ``supplied`` names arguments filled in automatically, which the user may not set.
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call itself complain
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n not in supplied]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{what} has no option {', '.join(map(repr, unknown))}; its options are: "
                         f"{', '.join(valid) or 'none'}")


_ALLOCATOR_TUNED = False


def keep_freed_cpu_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of any size for reuse instead of returning each one over 32 MiB to
    the operating system (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``, as the ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_`` environment variables would). torch's CPU tensors come from malloc: a stacked
    ensemble's gradient of 63 MB (20 × 784 × 1000 floats) was otherwise mapped and page-faulted afresh at every
    step, which measured slower than the whole arithmetic of the step (``benchmarks/ensemble_speed.py``).

    Once per process; does nothing off glibc, when the user set either variable, or with
    ``FBALIGN_KEEP_FREED_MEMORY=0``. The price: the process keeps its peak heap instead of shrinking after it.
    Returns whether the setting is in force."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import ctypes
    import ctypes.util
    import os
    import sys

    if (not sys.platform.startswith("linux") or os.environ.get("FBALIGN_KEEP_FREED_MEMORY", "1") == "0"
            or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))
    return _ALLOCATOR_TUNED
