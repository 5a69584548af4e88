"""The DeepSpeed JSON of a run: read, checked for this world size and device, and resolved into the
batch arithmetic, ZeRO stage, precision and offload the trainer needs (DSSettings).

Batch sizes live in the DeepSpeed JSON only; the trainer reads them back from the engine and checks
they match what was resolved here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from data.files import InputError, read_json_object

# Sections the trainer owns: the optimizer and schedule come from --lr/--wd/--warmup, TensorBoard is
# written by engine.run.log (DeepSpeed's own monitor needs the `tensorboard` package).
_OWNED_SECTIONS = {
    "optimizer": "remove it: the trainer builds AdamW from --lr/--wd (no decay on biases, norms, "
                 "embeddings, logit scale)",
    "scheduler": "remove it: the trainer schedules the learning rate from --warmup (linear) then cosine",
    "tensorboard": "remove it: the trainer writes TensorBoard scalars to <logs>/<name>/tensorboard itself",
}
CPU_CONFIG_HINT = "ds_configs/cpu_zero0_fp32.json or ds_configs/cpu_zero2_bf16.json"


@dataclass(frozen=True)
class DSSettings:
    """What the trainer needs to know about a DeepSpeed JSON, resolved for this world size."""
    path: str
    raw: Dict[str, Any]
    micro_batch: int
    grad_accum: int
    global_batch: int
    zero_stage: int
    precision: str  # "fp32" | "fp16" | "bf16"
    offload_optimizer: bool
    gradient_clipping: float

    def for_engine(self) -> Dict[str, Any]:
        """The dict handed to deepspeed.initialize (a copy: DeepSpeed mutates what it is given)."""
        return json.loads(json.dumps(self.raw))


def _positive_int(raw: Dict[str, Any], key: str, path: str) -> Optional[int]:
    v = raw.get(key)
    if v == "auto":
        raise InputError(f"{path}: {key} is 'auto'; give a number (auto is for the HF Trainer)")
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(f"{path}: {key} must be a positive integer, got {v!r}")
    return v


def _batch_sizes(raw: Dict[str, Any], path: str, ws: int) -> Tuple[int, int]:
    """(micro batch per rank, accumulation steps) from whichever of the three batch keys are given."""
    tbs, mbs, gas = (_positive_int(raw, k, path) for k in
                     ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    if mbs is None and tbs is None:
        raise InputError(f"{path}: give train_micro_batch_size_per_gpu (and gradient_accumulation_steps) "
                         "or train_batch_size")
    if mbs is not None and gas is not None:
        if tbs is not None and tbs != mbs * gas * ws:
            raise InputError(f"{path}: train_batch_size {tbs} != train_micro_batch_size_per_gpu {mbs} x "
                             f"gradient_accumulation_steps {gas} x world size {ws} = {mbs * gas * ws}; "
                             "drop train_batch_size and let it follow")
        return mbs, gas
    if mbs is not None:
        if tbs is None:
            return mbs, 1
        if tbs % (mbs * ws):
            raise InputError(f"{path}: train_batch_size {tbs} is not a multiple of "
                             f"train_micro_batch_size_per_gpu {mbs} x world size {ws}")
        return mbs, tbs // (mbs * ws)
    gas = gas or 1  # train_batch_size, maybe gradient_accumulation_steps
    if tbs % (gas * ws):
        raise InputError(f"{path}: train_batch_size {tbs} is not divisible by gradient_accumulation_steps "
                         f"{gas} x world size {ws}; give train_micro_batch_size_per_gpu instead")
    return tbs // (gas * ws), gas


def _clipping(raw: Dict[str, Any], path: str) -> float:
    if "gradient_clipping" not in raw:
        raise InputError(f"{path}: set gradient_clipping explicitly (DeepSpeed 0.19.3+ silently defaults "
                         "it to 1.0; use 0 for no clipping)")
    clip = raw["gradient_clipping"]
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0:
        raise InputError(f"{path}: gradient_clipping must be a number >= 0, got {clip!r}")
    return float(clip)


def _precision(raw: Dict[str, Any], path: str, on_gpu: bool) -> str:
    fp16 = bool((raw.get("fp16") or {}).get("enabled", False))
    bf16 = bool((raw.get("bf16") or raw.get("bfloat16") or {}).get("enabled", False))
    if fp16 and bf16:
        raise InputError(f"{path}: fp16 and bf16 are both enabled; enable one")
    if fp16 and not on_gpu:
        raise InputError(f"{path}: fp16 is not supported on CPU (DeepSpeed refuses it); use {CPU_CONFIG_HINT}")
    if (raw.get("amp") or {}).get("enabled", False):
        raise InputError(f"{path}: 'amp' (apex AMP) is not supported; use the fp16 or bf16 section")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _zero(raw: Dict[str, Any], path: str) -> Tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded)."""
    zero = raw.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise InputError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    off_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    off_par = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    if off_opt and stage == 0:
        raise InputError(f"{path}: offload_optimizer needs zero_optimization.stage >= 1")
    if off_par and stage != 3:
        raise InputError(f"{path}: offload_param needs zero_optimization.stage 3")
    return stage, off_opt


def load_ds_settings(path: Optional[str], world_size: int, on_gpu: bool) -> DSSettings:
    """Read and check a DeepSpeed JSON for this world size and device."""
    if not path:
        raise InputError("--deepspeed_config is required: pick one from ds_configs/ "
                         f"(on CPU: {CPU_CONFIG_HINT})")
    if not Path(path).is_file():
        raise InputError(f"--deepspeed_config {path}: file not found")
    raw = read_json_object(path)
    for key, why in _OWNED_SECTIONS.items():
        section = raw.get(key)
        if section is not None and (key != "tensorboard" or section.get("enabled", False)):
            raise InputError(f"{path}: has a '{key}' section; {why}")
    micro, gas = _batch_sizes(raw, path, world_size)
    clip = _clipping(raw, path)
    precision = _precision(raw, path, on_gpu)
    stage, off_opt = _zero(raw, path)
    return DSSettings(path=str(path), raw=raw, micro_batch=micro, grad_accum=gas,
                      global_batch=micro * gas * world_size, zero_stage=stage, precision=precision,
                      offload_optimizer=off_opt, gradient_clipping=clip)
