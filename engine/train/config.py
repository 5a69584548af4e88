"""Run settings: the command line plus the DeepSpeed JSON, validated before any work starts.

Everything a run needs is resolved here into frozen dataclasses, so a bad flag or config fails in
the first second with a message that says what to change, not after minutes of model building.
Batch sizes live in the DeepSpeed JSON only; the trainer reads them back from the engine and checks
they match what `DSSettings` resolved here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from data.files import InputError, read_json_object
from engine.train.speed import SpeedSettings, add_speed_arguments, speed_settings

# Sections the trainer owns: the optimizer and schedule come from --lr/--wd/--warmup, TensorBoard is
# written by engine.run.log (DeepSpeed's own monitor needs the `tensorboard` package).
_OWNED_SECTIONS = {
    "optimizer": "remove it: the trainer builds AdamW from --lr/--wd (no decay on biases, norms, "
                 "embeddings, logit scale)",
    "scheduler": "remove it: the trainer schedules the learning rate from --warmup (linear) then cosine",
    "tensorboard": "remove it: the trainer writes TensorBoard scalars to <logs>/<name>/tensorboard itself",
}
CPU_CONFIG_HINT = "ds_configs/cpu_zero0_fp32.json or ds_configs/cpu_zero2_bf16.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the Chinese CLIP dual encoder with DeepSpeed "
                    "(deepspeed launch/train.py --deepspeed_config ds_configs/X.json ...)")
    d = p.add_argument_group("data")
    d.add_argument("--train-data", required=True,
                   help="training queries (MUGE jsonl, with --train-img) or a launch/build_dataset.py folder")
    d.add_argument("--train-img", default=None, help="training image LMDB directory (launch/build_lmdb.py)")
    d.add_argument("--val-data", default=None, help="validation queries jsonl (with --val-img)")
    d.add_argument("--val-img", default=None, help="validation image LMDB directory")
    d.add_argument("--vocab", default=None,
                   help="tokenizer folder or vocab.txt (default: the --bert-weight-path folder's vocab.txt)")
    d.add_argument("--context-length", type=int, default=52, help="text tokens incl. [CLS]/[SEP]")
    d.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader workers per rank; 0 reads the LMDB in process, which measured fastest")
    d.add_argument("--shard-local", action="store_true",
                   help="each rank reads only its own run of the dataset's shards per epoch (a built, sharded "
                        "dataset; for node-local copies), instead of a global shuffle over all shards")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="ViT-B-16", help="vision config name (models/configs) or JSON path")
    m.add_argument("--text-model", default="RoBERTa-wwm-ext-base-chinese", help="text config name or JSON path")
    m.add_argument("--clip-weight-path", default=None, help="converted image tower .pt (models.weights)")
    m.add_argument("--bert-weight-path", default=None, help="converted text tower .pt or a RoBERTa folder")
    m.add_argument("--init-from", default=None,
                   help="whole-model init: Chinese-CLIP .pt, HF ChineseCLIP folder, or our model_fp32.pt")
    m.add_argument("--freeze-image-tower", action="store_true", help="train the text tower only")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    add_speed_arguments(p)

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=32)
    o.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps (0 = run all epochs); the schedule is unchanged")
    o.add_argument("--lr", type=float, default=8e-5, help="peak learning rate")
    o.add_argument("--wd", type=float, default=0.001, help="AdamW weight decay (not on biases/norms/embeddings)")
    o.add_argument("--warmup", type=int, default=500, help="linear warmup steps, then cosine to 0")
    o.add_argument("--seed", type=int, default=123)
    loss = o.add_mutually_exclusive_group()
    loss.add_argument("--local-loss", dest="local_loss", action="store_true", default=True,
                      help="(default) each rank scores its own rows against all gathered columns")
    loss.add_argument("--global-loss", dest="local_loss", action="store_false",
                      help="every rank scores the full gathered batch (memory quadratic in the global batch)")
    o.add_argument("--accumulation", choices=("exact", "plain"), default="exact",
                   help="with gradient_accumulation_steps > 1: 'exact' = negatives from every micro-batch "
                        "of the step (equals one k-times larger batch); 'plain' = each micro-batch on its "
                        "own (NOT equivalent: fewer negatives)")

    r = p.add_argument_group("run, logging, checkpoints")
    # --logdir: the same; torchrun's parser rejects --logs as an ambiguous prefix of its --logs-specs
    r.add_argument("--logs", "--logdir", dest="logs", default="./logs", help="root of run directories")
    r.add_argument("--name", default=None, help="run name: the run dir is <logs>/<name> (default: a timestamp)")
    r.add_argument("--save-frequency", type=int, default=1, help="checkpoint every N epochs (0 = off)")
    r.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0 = off)")
    r.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    r.add_argument("--resume", default=None, help="'latest' (this run's newest checkpoint) or a checkpoint dir")
    r.add_argument("--overwrite", action="store_true", help="start afresh in a run dir that holds a run: the "
                   "old run is moved to <logs>/<name>.old-<time> first (never deleted)")
    r.add_argument("--export", action="store_true",
                   help="write <run>/model_fp32.pt at the end: fp32 weights plus their record (configs, "
                   "vocab, context length, image preprocessing)")
    r.add_argument("--export-hf", action="store_true", help="also write <run>/hf, a transformers "
                   "ChineseCLIPModel folder with tokenizer and image processor (implies --export)")
    r.add_argument("--val-every-steps", type=int, default=0, help="validate every N steps (0 = each epoch)")
    r.add_argument("--log-every-steps", type=int, default=10, help="log line + TensorBoard scalars every N steps")
    r.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a collective may wait before the rank gives up (a dead peer ends the run)")
    # deepspeed.launcher.launch passes --local_rank; the environment's LOCAL_RANK is what we use.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    import deepspeed

    deepspeed.add_config_arguments(p)
    return p


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


@dataclass(frozen=True)
class TrainConfig:
    train_data: str
    train_img: Optional[str]  # None for a built data set (--train-data DIR)
    val_data: Optional[str]
    val_img: Optional[str]
    vocab: str
    context_length: int
    num_workers: int
    shard_local: bool
    model: str
    text_model: str
    clip_weight_path: Optional[str]
    bert_weight_path: Optional[str]
    init_from: Optional[str]
    freeze_image_tower: bool
    grad_checkpointing: bool
    epochs: int
    max_steps: int
    lr: float
    wd: float
    warmup: int
    seed: int
    local_loss: bool
    accumulation: str
    logs: str
    name: str
    save_frequency: int
    save_every_steps: int
    keep_last: int
    resume: Optional[str]
    export: bool
    export_hf: bool
    overwrite: bool
    val_every_steps: int
    log_every_steps: int
    dist_timeout: float
    world_size: int
    ds: DSSettings
    speed: SpeedSettings = SpeedSettings()

    @property
    def run_dir(self) -> Path:
        return Path(self.logs) / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def sampling(self) -> str:
        """The sampling mode recorded in checkpoints; a resume must use the same."""
        return "shard-local" if self.shard_local else "global"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _need_file(path: Optional[str], flag: str) -> None:
    if path is not None and not Path(path).is_file():
        raise InputError(f"{flag} {path}: file not found")


def _need_exists(path: Optional[str], flag: str) -> None:
    if path is not None and not Path(path).exists():
        raise InputError(f"{flag} {path}: no such file or directory")


def _resolve_model_config(name: str, flag: str, kind: str) -> None:
    """A known config name of this kind, or a path to a JSON file."""
    if name.endswith(".json") or os.sep in name:
        _need_file(name, flag)
        return
    from models import list_model_configs

    known = list_model_configs()[kind]
    if name not in known:
        raise InputError(f"{flag} {name}: unknown {kind} config; known: {', '.join(known)} "
                         f"(or pass a path to a JSON)")


def _resolve_vocab(args: argparse.Namespace) -> str:
    if args.vocab:
        _need_exists(args.vocab, "--vocab")
        return args.vocab
    if args.bert_weight_path and (Path(args.bert_weight_path) / "vocab.txt").is_file():
        return str(Path(args.bert_weight_path) / "vocab.txt")
    if args.init_from and (Path(args.init_from) / "vocab.txt").is_file():
        return str(Path(args.init_from) / "vocab.txt")
    raise InputError("no tokenizer: pass --vocab DIR_OR_VOCAB_TXT (the vocab.txt of the text tower; "
                     "the synthetic data set ships one)")


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

    def pos_int(key: str) -> Optional[int]:
        v = raw.get(key)
        if v is None or v == "auto":
            if v == "auto":
                raise InputError(f"{path}: {key} is 'auto'; give a number (auto is for the HF Trainer)")
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{path}: {key} must be a positive integer, got {v!r}")
        return v

    tbs, mbs, gas = (pos_int("train_batch_size"), pos_int("train_micro_batch_size_per_gpu"),
                     pos_int("gradient_accumulation_steps"))
    ws = world_size
    if mbs is None and tbs is None:
        raise InputError(f"{path}: give train_micro_batch_size_per_gpu (and gradient_accumulation_steps) "
                         "or train_batch_size")
    if mbs is not None and gas is not None:
        if tbs is not None and tbs != mbs * gas * ws:
            raise InputError(f"{path}: train_batch_size {tbs} != train_micro_batch_size_per_gpu {mbs} x "
                             f"gradient_accumulation_steps {gas} x world size {ws} = {mbs * gas * ws}; "
                             "drop train_batch_size and let it follow")
    elif mbs is not None:
        if tbs is None:
            gas = 1
        elif tbs % (mbs * ws):
            raise InputError(f"{path}: train_batch_size {tbs} is not a multiple of "
                             f"train_micro_batch_size_per_gpu {mbs} x world size {ws}")
        else:
            gas = tbs // (mbs * ws)
    else:  # train_batch_size, maybe gradient_accumulation_steps
        gas = gas or 1
        if tbs % (gas * ws):
            raise InputError(f"{path}: train_batch_size {tbs} is not divisible by gradient_accumulation_steps "
                             f"{gas} x world size {ws}; give train_micro_batch_size_per_gpu instead")
        mbs = tbs // (gas * ws)
    global_batch = mbs * gas * ws

    if "gradient_clipping" not in raw:
        raise InputError(f"{path}: set gradient_clipping explicitly (DeepSpeed 0.19.3+ silently defaults "
                         "it to 1.0; use 0 for no clipping)")
    clip = raw["gradient_clipping"]
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0:
        raise InputError(f"{path}: gradient_clipping must be a number >= 0, got {clip!r}")

    fp16 = bool((raw.get("fp16") or {}).get("enabled", False))
    bf16 = bool((raw.get("bf16") or raw.get("bfloat16") or {}).get("enabled", False))
    if fp16 and bf16:
        raise InputError(f"{path}: fp16 and bf16 are both enabled; enable one")
    if fp16 and not on_gpu:
        raise InputError(f"{path}: fp16 is not supported on CPU (DeepSpeed refuses it); use {CPU_CONFIG_HINT}")
    if (raw.get("amp") or {}).get("enabled", False):
        raise InputError(f"{path}: 'amp' (apex AMP) is not supported; use the fp16 or bf16 section")
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"

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
    return DSSettings(path=str(path), raw=raw, micro_batch=mbs, grad_accum=gas, global_batch=global_batch,
                      zero_stage=stage, precision=precision, offload_optimizer=off_opt,
                      gradient_clipping=float(clip))


def _default_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def build_config(args: argparse.Namespace, world_size: Optional[int] = None,
                 on_gpu: Optional[bool] = None, name: Optional[str] = None) -> TrainConfig:
    """Validate the parsed flags and the DeepSpeed JSON; raise InputError saying what to change.

    world_size defaults to the launcher's WORLD_SIZE (1 for a plain process), so this runs before the
    process group exists. `name` fills in a missing --name (the trainer broadcasts rank 0's).
    """
    import torch

    ws = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if args.deepspeed_config is None and getattr(args, "deepscale_config", None):
        args.deepspeed_config = args.deepscale_config
    ds = load_ds_settings(args.deepspeed_config, ws, gpu)

    if not Path(args.train_data).is_dir():  # a folder is a built data set (engine.loader.sources)
        _need_file(args.train_data, "--train-data")
    _need_exists(args.train_img, "--train-img")
    if (args.val_data is None) != (args.val_img is None):
        raise InputError("give both --val-data and --val-img (or neither)")
    _need_file(args.val_data, "--val-data")
    _need_exists(args.val_img, "--val-img")
    _resolve_model_config(args.model, "--model", "vision")
    _resolve_model_config(args.text_model, "--text-model", "text")
    _need_exists(args.clip_weight_path, "--clip-weight-path")
    _need_exists(args.bert_weight_path, "--bert-weight-path")
    _need_exists(args.init_from, "--init-from")
    if args.init_from and (args.clip_weight_path or args.bert_weight_path):
        raise InputError("--init-from loads the whole model; drop --clip-weight-path/--bert-weight-path "
                         "(or drop --init-from)")
    vocab = _resolve_vocab(args)
    from engine.loader.sources import check_data_flags

    check_data_flags(args.train_data, args.train_img, args.val_data, vocab, args.context_length)

    checks = [
        (args.context_length >= 3, "--context-length must be >= 3 ([CLS], a token, [SEP])"),
        (args.context_length <= 512, "--context-length must be <= 512 (BERT position embeddings)"),
        (args.num_workers >= 0, "--num-workers must be >= 0"),
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.max_steps >= 0, "--max-steps must be >= 0"),
        (args.lr > 0, "--lr must be > 0"),
        (args.wd >= 0, "--wd must be >= 0"),
        (args.warmup >= 0, "--warmup must be >= 0"),
        (args.save_frequency >= 0, "--save-frequency must be >= 0"),
        (args.save_every_steps >= 0, "--save-every-steps must be >= 0"),
        (args.keep_last >= 1, "--keep-last must be >= 1"),
        (args.val_every_steps >= 0, "--val-every-steps must be >= 0"),
        (args.log_every_steps >= 1, "--log-every-steps must be >= 1"),
        (args.dist_timeout > 0, "--dist-timeout must be > 0 seconds"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)

    run_name = args.name or name or _default_name()
    if "/" in run_name or run_name in (".", ".."):
        raise InputError(f"--name {run_name!r}: a plain name, not a path (the run dir is <logs>/<name>)")
    if args.resume and args.resume != "latest":
        _need_exists(args.resume, "--resume")
    if args.resume and args.overwrite:
        raise InputError("--overwrite starts afresh and --resume continues: give one of them")
    if args.resume == "latest":
        latest = Path(args.logs) / run_name / "checkpoints" / "latest"
        if not latest.is_file():
            raise InputError(f"--resume latest: {latest} not found (no completed checkpoint in this run; "
                             "check --logs/--name, or drop --resume)")

    return TrainConfig(
        train_data=args.train_data, train_img=args.train_img, val_data=args.val_data, val_img=args.val_img,
        vocab=vocab, context_length=args.context_length, num_workers=args.num_workers,
        shard_local=args.shard_local,
        model=args.model, text_model=args.text_model, clip_weight_path=args.clip_weight_path,
        bert_weight_path=args.bert_weight_path, init_from=args.init_from,
        freeze_image_tower=args.freeze_image_tower, grad_checkpointing=args.grad_checkpointing,
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, wd=args.wd, warmup=args.warmup,
        seed=args.seed, local_loss=args.local_loss, accumulation=args.accumulation, logs=args.logs,
        name=run_name, save_frequency=args.save_frequency, save_every_steps=args.save_every_steps,
        keep_last=args.keep_last, resume=args.resume, export=args.export or args.export_hf,
        export_hf=args.export_hf, overwrite=args.overwrite,
        val_every_steps=args.val_every_steps, log_every_steps=args.log_every_steps,
        dist_timeout=args.dist_timeout, world_size=ws, ds=ds, speed=speed_settings(args))


def write_config(cfg: TrainConfig, extra: Optional[Dict[str, Any]] = None) -> Path:
    """The resolved configuration (flags + DeepSpeed JSON + what the engine reported) as config.json."""
    from data.files import atomic_write

    out = cfg.run_dir / "config.json"
    payload = cfg.to_dict()
    if extra:
        payload["resolved"] = extra
    with atomic_write(out) as f:
        json.dump(payload, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    return out

