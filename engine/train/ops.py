"""DeepSpeed's JIT-built C++ ops (the CPU shared-memory comm op, CPU Adam, fused Adam): saying so before
a load that will build one or wait for another process's build; with what a launched process sets
up before DeepSpeed is imported (launch/train.py's first call). Where they are built: engine.dist
(use_checkout_extensions_dir), which every join through DeepSpeed passes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from engine import dist


def prepare_process() -> None:
    """What a launched process sets up before DeepSpeed is imported (train.py calls it first).

    DeepSpeed JIT-builds C++ ops (the CPU comm op, CPU Adam) into TORCH_EXTENSIONS_DIR: this checkout's
    folder from here on (engine.dist.use_checkout_extensions_dir), so that CPU Adam goes there too.
    """
    dist.use_checkout_extensions_dir()
    if not torch.cuda.is_available():
        # Without a GPU, CPU is the right device, not a fallback, and the ops are built for the CPU;
        # DeepSpeed and torch say both as warnings that read like a broken GPU set-up.
        _drop_log_lines("DeepSpeed", "Setting accelerator to CPU. If you have GPU")
        _drop_log_lines("torch.utils.cpp_extension", "No CUDA runtime is found")


def _drop_log_lines(logger: str, start: str) -> None:
    """Drop the records of one library logger whose message starts with `start` (just those)."""
    logging.getLogger(logger).addFilter(lambda record: not str(record.msg).startswith(start))


def jit_build_notice(builder_name: str, what: str) -> Optional[str]:
    """One line on rank 0, before DeepSpeed loads the JIT op `builder_name`, when that load will build
    it (no build of this checkout's sources yet) or wait for another process's build (its lock is
    held): either is silent and takes ~30 s or more, which looks like a hang. Returns the line."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils import cpp_extension

    try:
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is None or installed_ops.get(builder.name, False) or not builder.is_compatible():
            return None
        build = Path(cpp_extension._get_build_directory(builder.name, verbose=False))
        ninja, source = build / "build.ninja", os.path.abspath(builder.deepspeed_src_path(builder.sources()[0]))
        built = (build / f"{builder.name}.so").is_file() and ninja.is_file() and source in ninja.read_text()
    except Exception:  # noqa: BLE001  (a notice never stops a run; the load itself reports real failures)
        return None
    if _lock_held(build / "lock"):
        line = f"waiting for another process building {what} in {build} (may take ~30 s)"
    elif not built:
        line = f"building {what} for this checkout in {build} (once; may take ~30 s)"
    else:
        return None
    print(line, flush=True)
    return line


def _lock_held(path: Path) -> bool:
    """Whether another process holds the build's lock: torch takes an advisory lock (flock) on this
    file, which stays on disk after every build, so only trying the lock tells."""
    import fcntl

    if not path.is_file():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def comm_op_notice() -> Optional[str]:
    """jit_build_notice for the op DeepSpeed's CPU backend loads when the process group is joined, in
    the folder the join will build it in."""
    dist.use_checkout_extensions_dir()
    if torch.cuda.is_available():
        return None
    return jit_build_notice("ShareMemCommBuilder", "DeepSpeed's CPU shared-memory comm op")
