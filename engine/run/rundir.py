"""The run directory <logs>/<name>: whether this run may write into it, and when it is created.

A run never writes into another run's directory. Rank 0 decides before anything is written
(`claim`, a collective: every rank gets the verdict and refuses alike), and the directory is only
created (`create`) once every check that can fail before training has passed, so a run that dies
at start-up leaves no folder that later looks like a run.

- The directory is absent or empty: a new run.
- --resume: the run continues here (a checkpoint of another run dir may seed it only when this
  one is empty: two runs never share one directory).
- --overwrite: the old run is moved to <logs>/<name>.old-<YYYYmmdd-HHMMSS> when the new run starts,
  never deleted (disk is cheaper than a lost run; the user deletes the old copy when sure).
- Otherwise: refused, naming what is there and the two ways out.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from data.files import InputError
from engine import dist
from engine.run.log import ScalarWriter, attach_run_log

log = logging.getLogger(__name__)


def _contents(run_dir: Path) -> str:
    """What the run dir holds, in a few words ("config.json, checkpoints (latest step_00000004), ...")."""
    names = []
    for p in sorted(run_dir.iterdir()):
        latest = p / "latest"
        if p.name == "checkpoints" and latest.is_file():
            names.append(f"checkpoints (latest {latest.read_text(encoding='utf-8').strip()})")
        else:
            names.append(p.name + ("/" if p.is_dir() else ""))
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def verdict(run_dir: Path, resume: Optional[str], overwrite: bool) -> Optional[str]:
    """None when this run may use `run_dir`, else the one-line refusal. Pure (reads the disk only)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    if overwrite:
        return None
    held = _contents(run_dir)
    if resume:
        if resume == "latest" or _inside(Path(resume), run_dir):
            return None
        return (f"{run_dir} already holds another run ({held}); resuming {resume} into it would mix two "
                f"runs: choose a new --name for the resumed run")
    return (f"{run_dir} already holds a run ({held}); continue it with --resume latest, or start afresh "
            f"with --overwrite (moves it to {run_dir.name}.old-<time>), or choose another --name")


def claim(run_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """Rank 0 checks the run dir, every rank gets its verdict; raise InputError on every rank if
    refused. A collective; writes nothing."""
    message = verdict(run_dir, resume, overwrite) if dist.is_main() else None
    message = dist.broadcast_object(message)
    if message:
        raise InputError(message)


def move_aside(path: Path) -> Path:
    """Rename `path` (a run dir, or a checkpoint tag in the way) to <name>.old-<time>, a free name
    beside it; returns the new path. Work is moved, never deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
    path.rename(target)
    return target


def create(run_dir: Path, overwrite: bool) -> ScalarWriter:
    """Make the run dir on rank 0 (moving an old run aside first under --overwrite), start its
    train.log and return its TensorBoard writer (a no-op one on other ranks). A collective; call
    once every start-up check passed."""
    run_dir = Path(run_dir)
    if dist.is_main():
        moved = None
        if overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
            moved = move_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        attach_run_log(run_dir)
        if moved:
            log.info("--overwrite: the run that was in %s is now in %s", run_dir, moved)
    dist.barrier()
    return ScalarWriter(run_dir / "tensorboard" if dist.is_main() else None)
