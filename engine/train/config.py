"""Run settings: the parsed command line (flags.py) plus the DeepSpeed JSON (ds_settings.py), validated
before any work starts.

Everything a run needs is resolved here into frozen dataclasses, so a bad flag or config fails in
the first second with a message that says what to change, not after minutes of model building.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from data.files import InputError, atomic_write
from engine.train.ds_settings import DSSettings, load_ds_settings
from engine.train.recipe_settings import RecipeSettings, recipe_settings
from engine.train.speed import SpeedSettings, speed_settings


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
    train_mixture: Tuple[Tuple[str, float], ...] = ()  # (built data set, weight) per source of a mixture
    recipe: RecipeSettings = RecipeSettings()  # loss, distillation, locked towers, layer-wise lr decay

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


def _model_from_init(args: argparse.Namespace) -> argparse.Namespace:
    """--init-from names a model as every tool does (our model_fp32.pt or its run dir, an HF folder, a
    Chinese-CLIP .pt): what it records fills --model, --text-model, --vocab and --context-length, and
    any of them given must agree with it. Returns a copy of the flags with them filled in (the tools'
    defaults where nothing says otherwise)."""
    from engine.inference.naming import DEFAULT_CONTEXT, DEFAULT_TEXT, DEFAULT_VISION, TRAIN_FLAGS, model_path
    from engine.inference.source import check_agreement, config_names, describe

    filled = {"model": args.model, "text_model": args.text_model, "vocab": args.vocab,
              "context_length": args.context_length}
    path = model_path(args.init_from, None, TRAIN_FLAGS)
    desc = describe(path)
    if desc is not None:
        check_agreement(desc, path, TRAIN_FLAGS, args.model, args.text_model, args.vocab, args.context_length)
        vision, text = config_names(desc.vision, desc.text)
        for flag, key, name in (("--model", "model", vision), ("--text-model", "text_model", text)):
            if filled[key] is None and name is None:
                raise InputError(f"--init-from {args.init_from}: its {desc.what} describes a model that no config "
                                 f"in models/configs is; pass {flag} with a JSON of it")
            filled[key] = filled[key] or name
        if filled["vocab"] is None and desc.vocab_path is None and desc.vocab_text is not None:
            raise InputError(f"--init-from {args.init_from} carries its vocabulary, but the file it was read from "
                             f"is gone or changed: pass --vocab with that vocab.txt")
        filled["vocab"] = filled["vocab"] or (str(desc.vocab_path) if desc.vocab_path else None)
        filled["context_length"] = filled["context_length"] or desc.context_length
        filled["init_from"] = str(path)
    filled["model"] = filled["model"] or DEFAULT_VISION
    filled["text_model"] = filled["text_model"] or DEFAULT_TEXT
    filled["context_length"] = filled["context_length"] or DEFAULT_CONTEXT
    return argparse.Namespace(**{**vars(args), **filled})


def _default_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _check_paths(args: argparse.Namespace) -> None:
    """Every file and folder the flags name exists, and the flags that go together are given together."""
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


def _check_numbers(args: argparse.Namespace) -> None:
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


def _run_name(args: argparse.Namespace, name: Optional[str]) -> str:
    """The run's name, checked together with --resume/--overwrite (which name a run dir's state)."""
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
    return run_name


def build_config(args: argparse.Namespace, world_size: Optional[int] = None,
                 on_gpu: Optional[bool] = None, name: Optional[str] = None) -> TrainConfig:
    """Validate the parsed flags and the DeepSpeed JSON; raise InputError saying what to change.

    world_size defaults to the launcher's WORLD_SIZE (1 for a plain process), so this runs before the
    process group exists. `name` fills in a missing --name (the trainer broadcasts rank 0's).
    """
    import torch  # here, not at the top: `train.py --help` and flag errors answer without it

    from engine.loader.mixture import WEIGHT_SEP, check_mixture, parse_train_data  # imports torch as well
    from engine.loader.sources import check_data_flags

    ws = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if args.deepspeed_config is None and getattr(args, "deepscale_config", None):
        args.deepspeed_config = args.deepscale_config
    ds = load_ds_settings(args.deepspeed_config, ws, gpu)
    args = _model_from_init(args)
    sources = parse_train_data(args.train_data, getattr(args, "train_data_weights", None))
    args = argparse.Namespace(**{**vars(args), "train_data": sources[0][0]})  # a mixture's others: check_mixture
    _check_paths(args)
    vocab = _resolve_vocab(args)
    check_data_flags(args.train_data, args.train_img, args.val_data, vocab, args.context_length)
    if len(sources) > 1:
        check_mixture(sources, vocab, args.context_length)
        args.train_data = " + ".join(f"{p}{WEIGHT_SEP}{w:g}" for p, w in sources)
    _check_numbers(args)
    run_name = _run_name(args, name)
    return TrainConfig(
        train_data=args.train_data, train_img=args.train_img, val_data=args.val_data, val_img=args.val_img,
        vocab=vocab, context_length=args.context_length, num_workers=args.num_workers,
        shard_local=args.shard_local,
        model=args.model, text_model=args.text_model, clip_weight_path=args.clip_weight_path,
        bert_weight_path=args.bert_weight_path, init_from=args.init_from,
        grad_checkpointing=args.grad_checkpointing,
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, wd=args.wd, warmup=args.warmup,
        seed=args.seed, local_loss=args.local_loss, accumulation=args.accumulation, logs=args.logs,
        name=run_name, save_frequency=args.save_frequency, save_every_steps=args.save_every_steps,
        keep_last=args.keep_last, resume=args.resume, export=args.export or args.export_hf,
        export_hf=args.export_hf, overwrite=args.overwrite,
        val_every_steps=args.val_every_steps, log_every_steps=args.log_every_steps,
        dist_timeout=args.dist_timeout, world_size=ws, ds=ds, speed=speed_settings(args),
        train_mixture=tuple(sources) if len(sources) > 1 else (), recipe=recipe_settings(args))


def write_config(cfg: TrainConfig, extra: Optional[Dict[str, Any]] = None) -> Path:
    """The resolved configuration (flags + DeepSpeed JSON + what the engine reported) as config.json."""
    out = cfg.run_dir / "config.json"
    payload = cfg.to_dict()
    if extra:
        payload["resolved"] = extra
    with atomic_write(out) as f:
        json.dump(payload, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    return out

