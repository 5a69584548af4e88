"""The compiled selection of the CPU top-k (engine/retrieval/csrc/topk_heap.c), built on first use and loaded
with ctypes; topk_cpu.HeapTopK runs it.

Why compiled: numpy's selection (topk_cpu.RunningTopK) is a chain of whole-tile passes driven from
Python (group maxima, a compare, a nonzero, a merge by sorting), ~9-10 % of the matmul time at
5k x 30k x 512, and most of it in the first tiles of each query chunk while the thresholds settle.
The C scan reads each score once and offers the few that pass to a per-query heap: ~4 %.

Build: the system C compiler, which DeepSpeed's CPU ops need already (`$CC`, else cc, gcc or
clang), with -O3 -march=native (plain -O3 where the compiler refuses it). The library is cached in
$CLIP_NATIVE_CACHE, else ~/.cache/clip_retrieval/native, under a name hashed from the source, the
compiler, the flags and this CPU's features: a home directory shared by a cluster never hands a
node a library built for another CPU. It is built into a temporary file and renamed, so ranks
building at once do not clash. Without a compiler, or when the build fails, `kernel()` returns None
and says why once; the caller then uses numpy's selection, which gives the same results (the
tests hold the two to each other). CLIP_TOPK_NATIVE=0 asks for numpy's.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "topk_heap.c"
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the first one the compiler accepts
_lock = threading.Lock()
_kernel = None  # the loaded C function; False once loading failed (not tried again)


def cache_dir() -> Path:
    base = os.environ.get("CLIP_NATIVE_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "clip_retrieval" / "native"


def _compiler() -> Optional[str]:
    for name in ([os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_features() -> str:
    """What -march=native depends on: the CPU's flag list on Linux, else its description."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _build(cc: str, source: bytes, flag_sets=FLAG_SETS) -> Path:
    """The cached library for this source, compiler and CPU, built with the first flag set the
    compiler accepts if missing."""
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(),
                                         _cpu_features().encode()])).hexdigest()[:16]
        lib = cache_dir() / f"topk_heap-{key}.so"
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, lib)  # atomic: a concurrent build of the same file is identical
                return lib
            errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def kernel():
    """The C scan `topk_heap_scan`, built and loaded on the first call; None when it is turned off
    (CLIP_TOPK_NATIVE=0) or cannot be built here (the reason is logged once)."""
    global _kernel
    if os.environ.get("CLIP_TOPK_NATIVE", "1") == "0":
        return None
    with _lock:
        if _kernel is None:
            _kernel = False
            cc = _compiler()
            if cc is None:
                log.warning("no C compiler found ($CC, cc, gcc, clang): the CPU top-k uses numpy's "
                            "selection, ~5% slower")
                return None
            try:
                _kernel = load(_build(cc, SOURCE.read_bytes()))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("could not build %s with %s (%s): the CPU top-k uses numpy's selection, "
                            "~5%% slower", SOURCE.name, cc, e)
                return None
        return _kernel or None


def load(lib: Path):
    """`topk_heap_scan` of a built library, ready to call (ctypes releases the GIL meanwhile)."""
    fn = ctypes.CDLL(str(lib)).topk_heap_scan
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn

