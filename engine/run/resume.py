"""Resuming a run: what the checkpoint holds against what this run asks, decided before DeepSpeed
loads anything, and the universal-checkpoint conversion for a changed world size.

What may change between the save and the resume:
- the world size, and with it the split of the global batch into micro batch x accumulation x ranks,
  as long as the global batch and the data (train_pairs) stay the same (then so do the steps per
  epoch: floor(floor(N / W) / (G / W)) = floor(N / G), and the learning-rate schedule). The
  data stream then continues at the exact next sample: the sampler gives rank r of W the global
  positions j*W + r, so after S steps the consumed positions are [0, S*G) for any W, and each rank's
  start in the epoch is saved_start * W_old / W_new = steps x micro x accumulation (exact).
  ZeRO 1/2/3 partition the optimizer state by rank, so such a resume goes through DeepSpeed's
  universal checkpoint (ZeRO-3's load needs two repairs, checkpoint._repair_zero3_universal_load):
  rank 0 converts the tag once (deepspeed.checkpoint.ds_to_universal) into <tag>/universal,
  atomically, and every rank loads that with "checkpoint": {"load_universal": true}.
- nothing else: a different ZeRO stage or precision, global batch or data are refused with one line
  saying what was saved, what is asked and how to go on (a new run from the exported fp32 weights).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from data.files import InputError, atomic_write
from engine import dist
from engine.run import checkpoint

log = logging.getLogger("clip")

UNIVERSAL = "universal"  # the converted form's folder inside its tag
FAILED = "universal.failed"  # rank 0's error message when the conversion failed
CONVERT_WAIT_S = 6 * 3600  # how long the other ranks wait for rank 0's conversion (a huge model)
NEW_RUN_HINT = ("to change it, start a new run from the weights: --init-from <run>/model_fp32.pt (written by "
                "--export; or DeepSpeed's zero_to_fp32.py on the checkpoint folder)")


@dataclass(frozen=True)
class RunShape:
    """What this run asks, in the terms a checkpoint records."""
    world_size: int
    micro_batch: int
    grad_accum: int
    train_pairs: int
    zero_stage: int
    precision: str
    sampling: str = "global"  # or "shard-local" (data.sampler)
    mixture: Tuple = ()  # [pairs, weight] per source of a mixture of data sets (engine.loader.mixture)
    recipe: Optional[Dict[str, Any]] = None  # loss, locks, lr decay (engine.train.recipe_settings)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    def record(self) -> Dict[str, Any]:
        """The fields a checkpoint's client_state keeps (Trainer.save)."""
        return {"world_size": self.world_size, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "train_pairs": self.train_pairs, "zero_stage": self.zero_stage, "precision": self.precision,
                "sampling": self.sampling, "mixture": [list(m) for m in self.mixture],
                **({"recipe": self.recipe} if self.recipe is not None else {})}


@dataclass(frozen=True)
class ResumePlan:
    source: Path  # the complete tag dir (meta.json, rng files)
    saved: Dict[str, Any] = field(repr=False)  # the client_state saved with it
    universal: bool  # world size changed with a partitioned optimizer: load the universal form

    @property
    def load_dir_and_tag(self) -> Tuple[Path, str]:
        """What to hand DeepSpeed's load_checkpoint."""
        return (self.source, UNIVERSAL) if self.universal else (self.source.parent, self.source.name)

    def engine_config(self) -> Dict[str, Any]:
        return {"checkpoint": {"load_universal": True}} if self.universal else {}


def _partitioned(tag_dir: Path) -> bool:
    """True when the optimizer state is split by rank (ZeRO 1/2/3, DeepSpeed's bf16 optimizer)."""
    return any(tag_dir.glob("*_optim_states.pt"))


def check(saved: Dict[str, Any], run: RunShape, where: str) -> None:
    """Raise InputError (one line) unless `run` may continue the checkpoint `saved` exactly."""
    def refuse(what: str, hint: str = NEW_RUN_HINT):
        raise InputError(f"--resume {where}: {what}; {hint}")

    if saved.get("train_pairs") != run.train_pairs:
        refuse(f"saved with {saved.get('train_pairs')} training pairs, this run has {run.train_pairs} "
               "(different data: the data stream cannot continue)")
    if [list(m) for m in saved.get("mixture", [])] != [list(m) for m in run.mixture]:
        refuse(f"saved with the mixture {saved.get('mixture') or 'none'} ([pairs, weight] per data set), this run "
               f"has {[list(m) for m in run.mixture] or 'none'} (the sample sequence depends on both)",
               "resume with the same --train-data and weights, or " + NEW_RUN_HINT.replace("to change it, ", ""))
    saved_sampling = saved.get("sampling", "global")  # checkpoints from before shard-local sampling
    if saved_sampling != run.sampling:
        refuse(f"saved with sampling={saved_sampling}, now sampling={run.sampling} (the data stream cannot "
               "continue in another order)", f"resume with{'' if saved_sampling == 'shard-local' else 'out'} "
               "--shard-local, or " + NEW_RUN_HINT.replace("to change it, ", ""))
    if "zero_stage" in saved and (saved["zero_stage"], saved["precision"]) != (run.zero_stage, run.precision):
        refuse(f"saved with ZeRO {saved['zero_stage']} {saved['precision']}, this run asks ZeRO {run.zero_stage} "
               f"{run.precision} (DeepSpeed cannot load optimizer state across ZeRO stages or precisions)",
               f"resume with a DeepSpeed config of ZeRO {saved['zero_stage']} {saved['precision']}, or " +
               NEW_RUN_HINT.replace("to change it, ", ""))
    if "zero_stage" not in saved:
        log.warning("--resume %s: the checkpoint does not record its ZeRO stage and precision (saved by an older "
                    "version); assuming ZeRO %d %s as this run asks (a mismatch fails inside DeepSpeed)",
                    where, run.zero_stage, run.precision)
    changed = {k: (v, run.recipe.get(k)) for k, v in saved.get("recipe", {}).items()
               if run.recipe is not None and run.recipe.get(k) != v}  # checkpoints from before: no record
    if changed:
        refuse("saved with " + ", ".join(f"{k}={old}" for k, (old, _) in changed.items()) + ", this run asks " +
               ", ".join(f"{k}={new}" for k, (_, new) in changed.items()) + " (the model's and optimizer's state "
               "depend on the loss, the locked towers and the lr decay)", "resume with the saved settings, or " +
               NEW_RUN_HINT.replace("to change it, ", ""))
    old = RunShape(int(saved["world_size"]), int(saved["micro_batch"]), int(saved["grad_accum"]),
                   int(saved["train_pairs"]), run.zero_stage, run.precision)
    split = lambda s: f"{s.micro_batch} x {s.grad_accum} x {s.world_size} ranks"  # noqa: E731
    if old.global_batch != run.global_batch:
        refuse(f"saved with global batch {old.global_batch} = micro {split(old)}, this run has {run.global_batch} "
               f"= {split(run)} (an exact resume keeps the global batch; any split of it over ranks works)")
    if old.world_size != run.world_size and run.sampling == "shard-local":
        # Shard-local order depends on the world size (rank r reads a contiguous run of N // W):
        # the consumed set after J samples per rank is not the same for another W.
        refuse(f"saved on {old.world_size} ranks with --shard-local, this run has {run.world_size}: the shard-local "
               "order depends on the world size", f"resume on {old.world_size} ranks, or " +
               NEW_RUN_HINT.replace("to change it, ", ""))


def plan(resume: str, ckpt_dir: Path, run: RunShape) -> ResumePlan:
    """Read and check the checkpoint --resume names; nothing is loaded yet."""
    base, tag = checkpoint.resolve(resume, ckpt_dir)
    source = base / tag
    saved = json.loads((source / checkpoint.META).read_text(encoding="utf-8"))["client_state"]
    check(saved, run, str(source))
    changed = int(saved["world_size"]) != run.world_size
    return ResumePlan(source, saved, universal=changed and _partitioned(source))


def data_position(saved: Dict[str, Any], run: RunShape, steps_per_epoch: int) -> Tuple[int, int]:
    """(epoch, optimizer steps into it) where this run's data stream continues. The saved per-rank
    count maps to this world size as saved_start * W_old / W_new, which is a whole number of this
    run's steps because the global batch is unchanged (checked by `check`)."""
    epoch, step_in_epoch = int(saved["epoch"]), int(saved["step_in_epoch"])
    done = int(saved.get("samples_per_rank_done", step_in_epoch * saved["micro_batch"] * saved["grad_accum"]))
    consumed = done * int(saved["world_size"])  # global positions [0, consumed) of this epoch are used
    per_rank, rest = divmod(consumed, run.world_size)
    steps, rest2 = divmod(per_rank, run.micro_batch * run.grad_accum)
    if rest or rest2 or steps != step_in_epoch:
        raise InputError(f"checkpoint data position {done} samples x {saved['world_size']} ranks does not map to "
                         f"whole steps of {run.micro_batch} x {run.grad_accum} on {run.world_size} ranks")
    if steps >= steps_per_epoch:
        return epoch + 1, 0
    return epoch, steps


def prepare(resume: str, ckpt_dir: Path, run: RunShape) -> ResumePlan:
    """`plan`, then the universal form of the checkpoint when the plan needs one: rank 0 converts
    (once: an existing one is reused), the other ranks wait for it to appear. Call before
    deepspeed.initialize (the plan's engine_config goes into its config)."""
    p = plan(resume, ckpt_dir, run)
    if not p.universal:
        return p
    target, failed = p.source / UNIVERSAL, p.source / FAILED
    if dist.is_main() and not target.is_dir():
        failed.unlink(missing_ok=True)
        try:
            _convert(p.source, target)
        except InputError as e:  # tell the waiting ranks (maybe on other nodes) too
            with atomic_write(failed) as f:
                f.write(str(e))
            raise
    deadline = time.monotonic() + CONVERT_WAIT_S
    while not target.is_dir():  # a file-system wait, not a collective: the conversion may take long
        if failed.is_file():
            raise InputError(failed.read_text(encoding="utf-8"))
        if time.monotonic() > deadline:
            raise InputError(f"{target} did not appear within {CONVERT_WAIT_S} s (rank 0 converts it)")
        time.sleep(1.0)
    return p


def _convert(source: Path, target: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    for stale in source.glob(f"{UNIVERSAL}.tmp-*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f"{UNIVERSAL}.tmp-{os.getpid()}")
    log.info("world size changed: converting %s to DeepSpeed's universal checkpoint in %s", source, target)
    t0 = time.perf_counter()
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # our saves carry no Megatron-style info block
    try:
        ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - say which checkpoint and what failed, in one line
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"--resume {source}: converting it to a universal checkpoint for the new world size "
                         f"failed ({type(e).__name__}: {e}); resume on {source.name}'s original world size, or "
                         + NEW_RUN_HINT.replace("to change it, ", "")) from None
    os.replace(tmp, target)  # atomic: a kill mid-conversion leaves only a .tmp folder, never a partial one
    log.info("universal checkpoint ready in %.1fs", time.perf_counter() - t0)
