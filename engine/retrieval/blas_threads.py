"""The thread count of numpy's BLAS, and a way to run a section with one BLAS thread.

Why: the CPU top-k (engine/retrieval/cpu_topk.py) runs one worker thread per core, each doing one-thread
matmuls and then its own pass over the scores, so that one worker's pass overlaps the other's
matmul. With the BLAS's own threads, every pass would leave the other core idle (~10% of the
time on 2 cores). numpy has no such control; the OpenBLAS that numpy's wheels ship
(scipy-openblas) does, through a C function reached here with ctypes. Where it cannot be found
(MKL, Accelerate, an unknown BLAS), `blas_threads()` is None and callers leave the BLAS alone.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading
from contextlib import contextmanager
from typing import Optional

# (getter, setter) pairs of the OpenBLAS builds numpy has shipped: scipy-openblas with 64-bit
# integers, with 32-bit ones, and a plain OpenBLAS.
_SYMBOLS = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads")]

_lock = threading.Lock()
_api = None  # (get, set) once looked up; False when there is none
_users = 0  # sections inside single_thread_blas() now (the setting is process-wide)
_saved = 0


def _numpy_openblas_paths():
    """Paths of the OpenBLAS libraries numpy loaded: the mapped ones inside numpy's install
    (Linux), else the ones its wheel bundles (numpy.libs, numpy/.dylibs)."""
    import numpy as np

    root = os.path.dirname(os.path.realpath(np.__file__))
    bundled = [root + ".libs", os.path.join(root, ".dylibs")]
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if "/" in line else ""
                if "openblas" in os.path.basename(path).lower() and path.startswith(tuple(bundled)):
                    found.append(path)
    except OSError:
        pass
    for d in bundled:
        found += sorted(glob.glob(os.path.join(d, "*openblas*")))
    return list(dict.fromkeys(found))


def _lookup():
    global _api
    if _api is None:
        _api = False
        for path in _numpy_openblas_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for get, set_ in _SYMBOLS:
                if hasattr(lib, get) and hasattr(lib, set_):
                    getter, setter = getattr(lib, get), getattr(lib, set_)
                    getter.restype, getter.argtypes = ctypes.c_int, []
                    setter.restype, setter.argtypes = None, [ctypes.c_int]
                    _api = (getter, setter)
                    return _api
    return _api


def blas_threads() -> Optional[int]:
    """Threads numpy's OpenBLAS uses now, or None when it cannot be told (or set)."""
    api = _lookup()
    return int(api[0]()) if api else None


@contextmanager
def single_thread_blas():
    """numpy's BLAS on one thread inside the block (process-wide; nested and concurrent sections
    share it, the last one out restores the previous count). Yields that previous count, or None
    when the BLAS cannot be controlled (then nothing changes)."""
    global _users, _saved
    api = _lookup()
    if not api:
        yield None
        return
    with _lock:
        if _users == 0:
            _saved = int(api[0]())
            api[1](1)
        _users += 1
        before = _saved
    try:
        yield before
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                api[1](_saved)
