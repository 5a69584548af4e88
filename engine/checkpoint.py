"""Crash-safe DeepSpeed checkpoints, exact resume state, and the consolidated fp32 export.

Layout under <run>/checkpoints/:
    step_00000120/        DeepSpeed's files (model states, ZeRO partitions) for optimizer step 120
        rng_rank{r}.pt    this rank's RNG states (DeepSpeed's client_state is written by rank 0 only)
        meta.json         written last, by rank 0, once every rank finished: marks the tag complete
    latest                the newest complete tag; rewritten atomically only after meta.json exists

A kill at any moment therefore leaves `latest` naming a complete checkpoint: a half-written tag dir
has no meta.json and is never named by `latest` (and is deleted when the run passes it again).
"""
from __future__ import annotations

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


def save(engine, ckpt_dir: Path, step: int, client_state: Dict[str, Any], keep_last: int) -> str:
    """Save a complete checkpoint for `step` on every rank; returns the tag. A collective."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # left by an earlier run that died while saving this same step
            shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    with atomic_path(tag_dir / f"rng_rank{dist.rank()}.pt") as tmp:
        torch.save(rng_state(), tmp)
    _fault_point(step)
    dist.barrier()  # every rank's files are on disk before the tag is declared complete
    if dist.is_main():
        meta = {"step": step, "world_size": dist.world_size(), "client_state": client_state}
        with atomic_write(tag_dir / META) as f:
            json.dump(meta, f, indent=2)
        with atomic_write(ckpt_dir / LATEST) as f:
            f.write(tag + "\n")
        prune(ckpt_dir, keep_last, newest=step)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int, newest: int) -> None:
    """Keep the newest `keep_last` tags up to `newest`; delete the rest, including leftovers past
    `newest` (a crashed run's future that this run is redoing)."""
    tags = sorted((int(m.group(1)), p) for p in Path(ckpt_dir).iterdir()
                  if p.is_dir() and (m := TAG_RE.match(p.name)))
    kept = [p for s, p in tags if s <= newest][-keep_last:]
    for _, p in tags:
        if p not in kept:
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


def load(engine, load_dir: Path, tag: str, rng_dir: Optional[Path]) -> Dict[str, Any]:
    """Load model/optimizer/scheduler state into a fresh engine, and this rank's RNG states from
    rng_dir (the tag's folder; None: not restored); returns the client_state saved with it."""
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise InputError(f"could not load checkpoint {Path(load_dir) / tag}")
    if rng_dir is None:
        return client_state or {}
    rng_file = Path(rng_dir) / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s missing: RNG states not restored (resume is exact only without dropout)", rng_file)
    return client_state or {}


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


def export_fp32(engine, path: Path) -> Optional[Path]:
    """Write the consolidated fp32 state dict (plain tensors, torch.load(weights_only=True)) on
    rank 0, atomically. A collective."""
    state = consolidated_fp32_state_dict(engine)
    if state is not None:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    dist.barrier()
    return Path(path) if state is not None else None
