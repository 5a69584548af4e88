"""Crash-safe DeepSpeed checkpoints, exact resume state, and the consolidated fp32 export.

Layout under <run>/checkpoints/:
    step_00000120/        DeepSpeed's files (model states, ZeRO partitions) for optimizer step 120
        rng_rank{r}.pt    this rank's RNG states (DeepSpeed's client_state is written by rank 0 only)
        meta.json         written last, by rank 0, once every rank finished: marks the tag complete
    latest                the newest complete tag; rewritten atomically only after meta.json exists

A kill at any moment therefore leaves `latest` naming a complete checkpoint: a half-written tag dir
has no meta.json and is never named by `latest` (and is deleted when the run saves that step again).

Ownership: every checkpoint records its run's `run_id` (client_state; a resumed run keeps the id
of the checkpoint it resumed from). Pruning deletes only complete tags of this run id, up to the
step just saved: another run's tags, tags written before run ids existed and half-written tags are
never pruned, and a complete tag in the way of a save is moved aside, not deleted.

A save that fails for lack of disk space raises NoSpaceError naming the path; `latest` still names
the previous complete checkpoint.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from data.files import InputError, atomic_path, atomic_write
from engine import dist
from engine.run.rundir import move_aside
from models.weights.model_file import save_model_file

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8,})$")
META = "meta.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# --- RNG state ------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    """This process's RNG states, as plain tensors/ints so torch.load(weights_only=True) reads them."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- save -----------------------------------------------------------------------------------------

def _fault_point(step: int) -> None:
    """Test hook: CLIP_TEST_DIE_IN_SAVE=N SIGKILLs this process in the save of step N, after its
    files are written and before the tag is committed (the worst moment for a crash)."""
    if os.environ.get("CLIP_TEST_DIE_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


class NoSpaceError(InputError):
    """The disk filled up during a save (the CLI prints one line and exits 2)."""


def _clear_the_way(tag_dir: Path) -> None:
    """Rank 0, before saving into tag_dir: a half-written one (no meta.json) is the debris of a
    crashed save and is removed; a complete one (a branch from an earlier step met its own
    future) is work, and is moved aside to <tag>.old-<time>."""
    if not tag_dir.exists():
        return
    if not (tag_dir / META).is_file():
        shutil.rmtree(tag_dir)
        return
    aside = move_aside(tag_dir)
    log.warning("%s already held a complete checkpoint; moved it to %s", tag_dir, aside.name)


def save(engine, ckpt_dir: Path, step: int, client_state: Dict[str, Any], keep_last: int) -> str:
    """Save a complete checkpoint for `step` on every rank; returns the tag. A collective.
    client_state["run_id"] marks the tag as this run's (see prune)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _clear_the_way(tag_dir)
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        with atomic_path(tag_dir / f"rng_rank{dist.rank()}.pt") as tmp:
            torch.save(rng_state(), tmp)
    except (OSError, RuntimeError) as e:
        raise _no_space_or(e, ckpt_dir, tag)
    _fault_point(step)
    dist.barrier()  # every rank's files are on disk before the tag is declared complete
    if dist.is_main():
        meta = {"step": step, "world_size": dist.world_size(), "client_state": client_state}
        try:
            with atomic_write(tag_dir / META) as f:
                json.dump(meta, f, indent=2)
            with atomic_write(ckpt_dir / LATEST) as f:
                f.write(tag + "\n")
        except OSError as e:
            raise _no_space_or(e, ckpt_dir, tag)
        prune(ckpt_dir, keep_last, newest=step, run_id=client_state.get("run_id"))
    dist.barrier()
    return tag


def _tag_bytes(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file()) if tag_dir.is_dir() else 0


def _disk_full(error: Exception, free: int, need: int) -> bool:
    """Whether a failed write ran out of disk: ENOSPC/EDQUOT say so; torch's and DeepSpeed's writers
    only say 'iostream error' / 'file write failed', so there less room left than the write needed
    (or under 16 MiB) counts as full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return free < max(need, 16 << 20)


def _no_space_or(error: Exception, ckpt_dir: Path, tag: str) -> Exception:
    """A NoSpaceError when the disk is full (ENOSPC/EDQUOT, or DeepSpeed's opaque 'iostream error'
    while less space is left than the last checkpoint took), else the error itself."""
    latest = ckpt_dir / LATEST
    previous = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
    free = shutil.disk_usage(ckpt_dir).free
    if not _disk_full(error, free, _tag_bytes(ckpt_dir / previous) if previous else 0):
        return error
    kept = (f"the last complete checkpoint {previous} stays `latest` (resume with --resume latest once "
            f"there is room)" if previous else "no earlier checkpoint of this run exists")
    return NoSpaceError(f"no space left on {ckpt_dir} while saving checkpoint {tag} ({free / 2**20:.0f} MiB "
                        f"free; {type(error).__name__}: {error}); {kept}; the half-written {tag} is never "
                        f"named by `latest` and can be deleted")


def _owner(tag_dir: Path) -> Optional[str]:
    try:
        meta = json.loads((tag_dir / META).read_text(encoding="utf-8"))
        return (meta.get("client_state") or {}).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def prune(ckpt_dir: Path, keep_last: int, newest: int, run_id: Optional[str]) -> None:
    """Keep the newest `keep_last` complete tags of run `run_id` up to step `newest` and delete
    its older ones. Nothing else is touched: other runs' tags, tags without a run id, tags past
    `newest` (a branch's old future) and half-written ones stay."""
    if not run_id:
        return
    tags = sorted((int(m.group(1)), p) for p in Path(ckpt_dir).iterdir()
                  if p.is_dir() and (m := TAG_RE.match(p.name)))
    own = [p for s, p in tags if s <= newest and (p / META).is_file() and _owner(p) == run_id]
    for p in own[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


# --- resume ---------------------------------------------------------------------------------------

def resolve(resume: str, ckpt_dir: Path) -> Tuple[Path, str]:
    """--resume latest|PATH -> (DeepSpeed load_dir, tag). PATH may be a tag dir, a checkpoints dir
    holding `latest`, or a run dir. Only complete tags (with meta.json) are accepted."""
    if resume == "latest":
        base = Path(ckpt_dir)
    else:
        p = Path(resume)
        if (p / META).is_file() or TAG_RE.match(p.name):
            base, tag = p.parent, p.name
            if not (p / META).is_file():
                raise InputError(f"--resume {p}: incomplete checkpoint (no {META}; the save was interrupted); "
                                 f"resume from {p.parent} to take the newest complete one")
            return base, tag
        base = p / "checkpoints" if (p / "checkpoints" / LATEST).is_file() else p
    latest = base / LATEST
    if not latest.is_file():
        raise InputError(f"--resume {resume}: {latest} not found (no completed checkpoint there)")
    tag = latest.read_text(encoding="utf-8").strip()
    if not (base / tag / META).is_file():
        raise InputError(f"{latest} names {tag}, which is incomplete (no {META})")
    return base, tag


def load(engine, load_dir: Path, tag: str, rng_dir: Optional[Path], universal: bool = False) -> Dict[str, Any]:
    """Load model/optimizer/scheduler state into a fresh engine, and this rank's RNG states from
    rng_dir (the tag's folder; None: not restored); returns the client_state saved with it.
    `universal`: the tag is DeepSpeed's universal form (another world size, engine.run.resume)."""
    zero3_universal = universal and engine.zero_optimization_stage() == 3
    own = [{k: g[k] for k in ("weight_decay", "initial_lr") if k in g}
           for g in engine.optimizer.optimizer.param_groups] if zero3_universal else None
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise InputError(f"could not load checkpoint {Path(load_dir) / tag}")
    if zero3_universal:
        _repair_zero3_universal_load(engine.optimizer.optimizer, own)
    if rng_dir is None:
        return client_state or {}
    rng_file = Path(rng_dir) / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s missing: RNG states not restored (resume is exact only without dropout)", rng_file)
    return client_state or {}


def _repair_zero3_universal_load(base_optimizer, own_settings) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load
    (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), found by comparing a 2 -> 1 rank
    resume with the uninterrupted run step by step:
    - it hands every ZeRO-3 sub-group's optimizer state one and the same `step` tensor, and Adam
      increments it in place once per sub-group per step: from the second sub-group on (here: the
      no-decay group) the bias correction runs ahead, and those weights ended ~2 % off after one
      step. Each state gets its own copy.
    - it copies param group 0's hyperparameters into every group, so the no-decay group would get
      weight decay. Each group gets back its own (read before the load: `weight_decay`, and under
      layer-wise lr decay its `initial_lr`, with the loaded rate scaled by the same ratio: what our
      groups differ in, engine.train.optim.param_groups)."""
    for state in base_optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for group, own in zip(base_optimizer.param_groups, own_settings):
        group["weight_decay"] = own["weight_decay"]
        loaded_lr, loaded_initial = group.get("lr"), group.get("initial_lr")
        if loaded_lr is not None and loaded_initial and own.get("initial_lr"):
            group["lr"], group["initial_lr"] = loaded_lr * own["initial_lr"] / loaded_initial, own["initial_lr"]


# --- export ---------------------------------------------------------------------------------------

def consolidated_fp32_state_dict(engine) -> Optional[Dict[str, torch.Tensor]]:
    """The full model in fp32, assembled from the optimizer's fp32 master weights where there are any
    (ZeRO 1/2/3, bf16), else from the module. A collective: call on every rank; rank 0 gets the
    dict, the others None."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    full: Dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        if value is None:
            if zero3:  # a frozen partitioned parameter: gather the (model-dtype) full tensor
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    value = p.detach().clone()
            else:
                value = p.detach()
        full[name] = value.detach().to("cpu", torch.float32).clone()
    if not dist.is_main():
        return None
    out: Dict[str, torch.Tensor] = {}
    for key, tensor in module.state_dict().items():
        if key in full:
            out[key] = full[key]
        else:  # a buffer: float ones back to fp32, integer ones (position ids) as they are
            out[key] = tensor.detach().to("cpu").clone()
            if out[key].is_floating_point():
                out[key] = out[key].float()
    return out


def export_fp32(engine, path: Path, record: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """Write the consolidated fp32 weights on rank 0, atomically, loadable with
    torch.load(weights_only=True): with `record` a self-describing model file (models/weights/model_file.py),
    without it a plain state dict. A collective."""
    state = consolidated_fp32_state_dict(engine)
    if state is not None:
        try:
            save_model_file(state, record, path)
        except (OSError, RuntimeError) as e:
            free = shutil.disk_usage(Path(path).parent).free
            if not _disk_full(e, free, sum(t.numel() * t.element_size() for t in state.values())):
                raise
            raise NoSpaceError(f"no space left on {Path(path).parent} while writing {path} ({free / 2**20:.0f} MiB "
                               f"free; {type(e).__name__}: {e}); nothing was written there (the write is atomic) "
                               "and the run's checkpoints are intact: make room, then write the weights from the last "
                               "one with the zero_to_fp32.py beside them") from None
    dist.barrier()
    return Path(path) if state is not None else None
