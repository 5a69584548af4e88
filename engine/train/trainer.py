"""The training run: data, model, DeepSpeed engine, the step loop, validation, checkpoints, export.

Run state is explicit (the Trainer's fields and the checkpoint's client_state), never stored back
into argparse. Every collective goes through engine.dist; only rank 0 writes logs/TensorBoard.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
import uuid
from typing import Any, Dict, Optional

import deepspeed
import numpy as np
import torch
from tqdm import tqdm

from data.files import InputError
from data.tokenizer import load_tokenizer
from engine import dist
from engine.inference.source import load_weights_into
from engine.loader.batches import build_sampler, device_batches
from engine.loader.mixture import SourceShares, mixture_record
from engine.loader.sources import open_training_data, open_validation_data
from engine.run import checkpoint, resume, rundir
from engine.run.export import export_run, warn_preprocessing
from engine.run.log import ScalarWriter, setup_logging
from engine.train.config import TrainConfig, write_config
from engine.train.faults import inject_test_fault
from engine.train import ops
from engine.train.optim import build_optimizer, scheduler_factory
from engine.train.recipe import Recipe
from engine.train.speed import Throughput
from engine.train.step import ContrastiveStep
from engine.train.threads import apply_threads
from engine.train.validation import describe, validate_in_training
from models import build_clip, load_text_config, load_vision_config
from models.weights import VocabMismatchError, load_image_tower, load_text_tower

log = logging.getLogger("clip")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _LogWindow:
    """The steps since the last log line: their count, summed loss and time. Throughput counts data
    loading + forward/backward/step only, not validation or saving."""

    def __init__(self):
        self.steps, self.loss, self.seconds, self.parts = 0, 0.0, 0.0, {}  # parts: the loss's, summed

    def add(self, seconds: float, result) -> None:
        self.steps, self.loss, self.seconds = self.steps + 1, self.loss + result.loss, self.seconds + seconds
        self.parts = {k: self.parts.get(k, 0.0) + v for k, v in (result.parts or {}).items()}


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.engine = None
        self.tb: Optional[ScalarWriter] = None
        self.val = None  # (store, queries) of the validation split
        self.resume_plan = None  # resume.ResumePlan under --resume (set before the engine is built)
        self.recipe = Recipe(cfg)  # loss, teacher, locked towers, lr decay (engine/train/recipe.py)

    # --- building ---------------------------------------------------------------------------------

    def _build_data(self):
        cfg = self.cfg
        want = load_vision_config(cfg.model).image_resolution  # read from the config: nothing built yet
        self.tokenizer = load_tokenizer(cfg.vocab)
        data = open_training_data(cfg, self.tokenizer, want)
        self.dataset, self.store = data.dataset, data.images
        self.val = open_validation_data(cfg, want)

    def _vocab_size(self) -> Optional[int]:
        """The tokenizer's size when the text config says otherwise (the tiny/demo configs and a
        synthetic vocabulary); None when they agree."""
        cfg = self.cfg
        n_tok = len(self.tokenizer.get_vocab())
        n_cfg = load_text_config(cfg.text_model).vocab_size
        if n_tok == n_cfg:
            return None
        log.info("text embeddings sized to the tokenizer: %d tokens (%s)", n_tok, cfg.vocab)
        self._vocab_note = (f"--vocab {cfg.vocab} has {n_tok} tokens but --text-model {cfg.text_model} has "
                            f"vocab_size {n_cfg}: pretrained text weights need the tokenizer that came with them")
        return n_tok

    def _load_weights(self, model) -> None:
        cfg = self.cfg
        try:
            if cfg.init_from:  # named as every tool names a model (engine/inference/source.py)
                log.info("init: %s", load_weights_into(model, cfg.init_from))
                warn_preprocessing(cfg.init_from, self.store)
            if cfg.clip_weight_path:
                log.info("image tower: %s", load_image_tower(model, cfg.clip_weight_path))
            if cfg.bert_weight_path:
                log.info("text tower: %s", load_text_tower(model, cfg.bert_weight_path))
        except InputError as e:  # a vocabulary of another size: add the likely cause
            note = getattr(self, "_vocab_note", None) if isinstance(e, VocabMismatchError) else None
            raise InputError(f"{e}\n({note})" if note else str(e)) from None

    def _build_model(self):
        cfg = self.cfg
        max_pos = load_text_config(cfg.text_model).max_position_embeddings
        if cfg.context_length > max_pos:
            raise InputError(f"--context-length {cfg.context_length} exceeds the text model's "
                             f"max_position_embeddings {max_pos}")
        model = build_clip(cfg.model, cfg.text_model, grad_checkpointing=cfg.grad_checkpointing,
                           vocab_size=self._vocab_size(), patch_dropout=cfg.speed.patch_dropout)
        if not cfg.resume:  # a resumed run takes every weight from its checkpoint
            self._load_weights(model)
        self.recipe.prepare_model(model, self.tokenizer, self.store, _DTYPES[cfg.ds.precision])  # bias, locks, teacher
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model %s + %s: %.2fM parameters, %.2fM trainable", cfg.model, cfg.text_model,
                 n_all / 1e6, n_train / 1e6)
        return model

    def _build_engine(self, model, total_steps: int):
        cfg = self.cfg
        on_gpu = torch.cuda.is_available()
        if on_gpu:  # the optimizer should see the parameters where they will live
            model.to(dist.device())
        optimizer, opt_name = build_optimizer(self.recipe.param_groups(model), cfg.lr, on_gpu,
                                              cfg.ds.offload_optimizer)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=scheduler_factory(cfg.warmup, total_steps),
                                               config={**cfg.ds.for_engine(), **(self.resume_plan.engine_config()
                                                       if self.resume_plan else {})}, dist_init_required=False)
        micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        if (micro, gas) != (cfg.ds.micro_batch, cfg.ds.grad_accum):
            raise RuntimeError(f"DeepSpeed resolved micro batch {micro} x accumulation {gas}, expected "
                               f"{cfg.ds.micro_batch} x {cfg.ds.grad_accum} from {cfg.ds.path}")
        self.opt_name = opt_name
        if cfg.speed.compile:  # after initialize: DeepSpeed compiles the module it wraps
            engine.compile()
            log.info("model compiled with torch.compile (engine.compile())")
        return engine

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        cfg = self._join()
        seed_all(cfg.seed)  # the same initial weights on every rank
        self._build_data()
        model = self._build_model()
        self.rate = Throughput(model, cfg)  # TFLOP/s and MFU beside samples/s
        sampler = build_sampler(self.dataset, dist.rank(), cfg.world_size, cfg.seed, cfg.shard_local,
                                cfg.train_data)
        steps_per_epoch, total_steps = self._count_steps(sampler)
        self.shares = SourceShares(self.dataset, sampler)  # each source's share of a mixture, for TensorBoard
        self.shape = resume.RunShape(cfg.world_size, cfg.ds.micro_batch, cfg.ds.grad_accum, len(self.dataset),
                                     cfg.ds.zero_stage, cfg.ds.precision, cfg.sampling, mixture_record(self.dataset),
                                     recipe=cfg.recipe.state_signature())
        # Checked (and converted for a new world size) before DeepSpeed loads anything.
        self.resume_plan = resume.prepare(cfg.resume, cfg.checkpoint_dir, self.shape) if cfg.resume else None
        self.engine = self._build_engine(model, total_steps)
        self.device = dist.device()
        self.dtype = _DTYPES[cfg.ds.precision]

        epoch, start_step = 0, 0
        if cfg.resume:
            epoch, start_step = self._resume(steps_per_epoch)
        else:
            seed_all(cfg.seed + 1009 * dist.rank())  # per-rank dropout streams
        end_step = total_steps if not cfg.max_steps else min(total_steps, cfg.max_steps)
        self._open_run_dir(steps_per_epoch, total_steps, end_step)
        summary = self._loop(sampler, steps_per_epoch, epoch, start_step, end_step)
        if cfg.export:
            export_run(self.engine, cfg, self.store)
        return summary

    def _join(self) -> TrainConfig:
        """Join the process group, agree on the run's name and claim its run dir (nothing written yet)."""
        cfg = self.cfg
        ops.comm_op_notice()  # joining loads DeepSpeed's CPU comm op: a build is said before it starts
        dist.init_distributed(use_deepspeed=True, timeout_s=cfg.dist_timeout, always=True)
        if dist.world_size() != cfg.world_size:
            raise RuntimeError(f"validated for world size {cfg.world_size}, joined {dist.world_size()}")
        # A default run name is a timestamp: take rank 0's so all ranks write one run dir.
        cfg = self.cfg = dataclasses.replace(cfg, name=dist.broadcast_object(cfg.name))
        # The backstop behind the groups' timeouts; twice the timeout so no healthy step trips it.
        self.watchdog = dist.Watchdog(2 * cfg.dist_timeout, "2 x --dist-timeout", cfg.world_size > 1)
        setup_logging(None, dist.rank())  # train.log starts when the run dir is created (below)
        rundir.claim(cfg.run_dir, cfg.resume, cfg.overwrite)  # refused before anything is written
        log.info("run dir %s; world size %d; DeepSpeed config %s (ZeRO %d, %s)", cfg.run_dir, cfg.world_size,
                 cfg.ds.path, cfg.ds.zero_stage, cfg.ds.precision)
        self.run_id = dist.broadcast_object(uuid.uuid4().hex)  # marks this run's checkpoints (see prune)
        apply_threads(cfg.speed.threads)
        return cfg

    def _count_steps(self, sampler):
        """(optimizer steps per epoch, in the whole run)."""
        cfg, micro, gas = self.cfg, self.cfg.ds.micro_batch, self.cfg.ds.grad_accum
        steps_per_epoch = sampler.samples_per_rank // (micro * gas)
        if steps_per_epoch == 0:
            raise InputError(f"{cfg.train_data}: {len(self.dataset)} pairs are fewer than one global batch "
                             f"({cfg.ds.global_batch} = micro {micro} x accumulation {gas} x {cfg.world_size} "
                             f"ranks); lower the batch size in {cfg.ds.path}")
        return steps_per_epoch, cfg.epochs * steps_per_epoch

    def _open_run_dir(self, steps_per_epoch: int, total_steps: int, end_step: int) -> None:
        """Every start-up check passed: only now does the run dir appear (a failed start leaves none)."""
        cfg, micro, gas = self.cfg, self.cfg.ds.micro_batch, self.cfg.ds.grad_accum
        self.tb = rundir.create(cfg.run_dir, cfg.overwrite)
        if cfg.resume:  # the steps after the checkpoint are logged anew: TensorBoard drops the old points
            self.tb.restart_at(self.engine.global_steps + 1)
        if dist.is_main():
            write_config(cfg, {"micro_batch": micro, "grad_accum": gas, "global_batch": cfg.ds.global_batch,
                               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                               "end_step": end_step, "optimizer": self.opt_name, "train_pairs": len(self.dataset),
                               "deepspeed_config": cfg.ds.raw})
        log.info("%d steps/epoch x %d epochs = %d steps (running to %d); global batch %d = %d x %d x %d ranks; "
                 "loss %s, accumulation %s; optimizer %s", steps_per_epoch, cfg.epochs, total_steps, end_step,
                 cfg.ds.global_batch, micro, gas, cfg.world_size, "local" if cfg.local_loss else "global",
                 ("exact" if cfg.accumulation == "exact" else "plain") if gas > 1 else "none", self.opt_name)

    def _resume(self, steps_per_epoch: int):
        p = self.resume_plan
        load_dir, tag = p.load_dir_and_tag
        same_world = int(p.saved["world_size"]) == self.cfg.world_size
        # Another world size: rank r's saved RNG streams belong to another split of the batch.
        checkpoint.load(self.engine, load_dir, tag, rng_dir=p.source if same_world else None, universal=p.universal)
        self.run_id = p.saved.get("run_id") or self.run_id  # checkpoints from before run ids: a new id
        epoch, step_in_epoch = resume.data_position(p.saved, self.shape, steps_per_epoch)
        if not same_world:
            seed_all(self.cfg.seed + 1009 * dist.rank() + 7919 * self.engine.global_steps)
        log.info("resumed from %s%s: step %d, epoch %d, %d steps into it", p.source,
                 "" if same_world else f" (saved on {p.saved['world_size']} ranks, universal checkpoint)",
                 self.engine.global_steps, epoch, step_in_epoch)
        return epoch, step_in_epoch

    def _batches(self, sampler, epoch: int, start_step: int):
        """The epoch's micro-batches from start_step on, read one step ahead in the background and
        made ready for the device."""
        cfg, micro, gas = self.cfg, self.cfg.ds.micro_batch, self.cfg.ds.grad_accum
        return device_batches(self.dataset, sampler, epoch, start_step * micro * gas, micro, cfg.num_workers,
                              cfg.seed, self.device, self.store, self.dtype, depth=max(2, gas),
                              timeout_s=cfg.dist_timeout, shares=self.shares)

    def _stepper(self) -> ContrastiveStep:
        """The contrastive step over this run's engine and loss; the hook before each update also reads
        the gradient norm where DeepSpeed does not report it (ZeRO 0 in fp32)."""
        cfg, engine = self.cfg, self.engine
        loss_fn = self.recipe.loss_fn()  # CLIP's, SigLIP's or distillation's, collectives injected
        own_norm = cfg.ds.zero_stage == 0 and cfg.ds.precision == "fp32"
        self._own_norm = None

        def before_update():
            inject_test_fault(engine.global_steps + 1, before_update=True)
            if own_norm:
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                self._own_norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item() if grads else 0.0

        return ContrastiveStep(engine, loss_fn, cfg.ds.grad_accum, exact=cfg.accumulation == "exact",
                               step_index=lambda: engine.global_steps, before_last_step=before_update,
                               teacher=self.recipe.teacher)

    def _loop(self, sampler, steps_per_epoch: int, epoch: int, start_step: int, end_step: int) -> Dict[str, Any]:
        cfg, engine = self.cfg, self.engine
        stepper = self._stepper()
        engine.train()
        step = engine.global_steps
        # The bar is for a person watching rank 0; in a log file the log lines say the same.
        bar = tqdm(total=end_step, initial=step, disable=not (dist.is_main() and sys.stderr.isatty()),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
        self._window = _LogWindow()
        last: Dict[str, Any] = {}
        state: Optional[Dict[str, int]] = None  # where the data stream stands after the last step
        done = {"saved": -1, "validated": -1}
        it = None
        try:
            while step < end_step and epoch < cfg.epochs:
                it = self._batches(sampler, epoch, start_step)
                for step_in_epoch in range(start_step, steps_per_epoch):
                    lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves it on after)
                    t0 = time.perf_counter()
                    with self.watchdog.armed(f"step {step + 1}"):
                        result = stepper.run([next(it) for _ in range(cfg.ds.grad_accum)])
                    self._window.add(time.perf_counter() - t0, result)
                    step = engine.global_steps
                    state = {"epoch": epoch, "step_in_epoch": step_in_epoch + 1}
                    last = {"loss": result.loss, "logit_scale": result.logit_scale}
                    bar.update(1)
                    self._after_step(step, end_step, epoch, lr, result, state,
                                     step_in_epoch + 1 == steps_per_epoch, done)
                    inject_test_fault(step)
                    if step >= end_step:
                        break
                it.close()
                epoch, start_step = epoch + 1, 0
        finally:
            bar.close()
            if it is not None:
                it.close()
        # The final state is always kept when checkpoints are on (also when --max-steps cut it short).
        if state is not None and (cfg.save_frequency or cfg.save_every_steps) and done["saved"] != step:
            self.save(step, state)
        if state is not None and done["validated"] != step:  # the run's final score, wherever it stopped
            self.validate(step)
        self.tb.flush()
        return {"step": step, "epoch": epoch, **last}

    def _after_step(self, step: int, end_step: int, epoch: int, lr: float, result, state: Dict[str, int],
                    end_of_epoch: bool, done: Dict[str, int]) -> None:
        """What follows an optimizer step: the log line when due, validation and checkpoints."""
        cfg = self.cfg
        if not self.engine.was_step_applied():
            log.warning("step %d: fp16 gradient overflow, update skipped (loss scale now %s)", step,
                        self._loss_scale())
        if step % cfg.log_every_steps == 0 or step == end_step:
            w = self._window
            self._log_step(step, end_step, epoch, w.loss / w.steps, lr, result.logit_scale, self._own_norm,
                           w.steps, w.seconds)
            self._window = _LogWindow()
        val_due = (step % cfg.val_every_steps == 0) if cfg.val_every_steps else end_of_epoch
        if val_due:
            self.validate(step)
            done["validated"] = step
        if ((cfg.save_every_steps and step % cfg.save_every_steps == 0) or
                (end_of_epoch and cfg.save_frequency and (epoch + 1) % cfg.save_frequency == 0)):
            self.save(step, state)
            done["saved"] = step

    # --- pieces -----------------------------------------------------------------------------------

    def _loss_scale(self) -> Optional[float]:
        opt = self.engine.optimizer
        for name in ("cur_scale", "loss_scale"):
            v = getattr(opt, name, None)
            if isinstance(v, (int, float)) or torch.is_tensor(v):
                return float(v)
        return None

    def _log_step(self, step, end_step, epoch, loss, lr, logit_scale, own_norm, n_steps, elapsed):
        engine, cfg = self.engine, self.cfg
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else own_norm
        samples_s = cfg.ds.global_batch * n_steps / elapsed if elapsed > 0 else None
        step_time = elapsed / n_steps if n_steps else None
        scale16 = self._loss_scale() if cfg.ds.precision == "fp16" else None
        tflops, mfu = self.rate.figures(samples_s)
        recipe_text, recipe_scalars = self.recipe.report(self._window, engine.get_lr())  # parts, teacher, lr/tower
        log.info("step %d/%d epoch %d loss %.4f lr %.3g logit_scale %.2f grad_norm %s %.1f samples/s%s%s%s",
                 step, end_step, epoch, loss, lr, logit_scale,
                 f"{norm:.3g}" if norm is not None else "n/a", samples_s or 0.0, self.rate.text(tflops, mfu),
                 f" loss_scale {scale16:g}" if scale16 is not None else "", recipe_text)
        self.tb.add(step, {"train/loss": loss, "train/lr": lr, "train/logit_scale": logit_scale,
                           "train/grad_norm": norm, "train/loss_scale": scale16,
                           "train/samples_per_s": samples_s, "train/step_time_s": step_time,
                           "train/tflops": tflops, "train/mfu": mfu, **self.shares.scalars(), **recipe_scalars})

    def validate(self, step: int) -> Optional[Dict[str, float]]:
        """Full-pool recall both ways on the validation split (every rank takes part)."""
        if self.val is None:
            return None
        cfg = self.cfg
        t0 = time.perf_counter()
        metrics = validate_in_training(self.engine.module, cfg.ds.zero_stage, *self.val, self.tokenizer,
                                       cfg.context_length, cfg.ds.micro_batch * 2, self.device)
        log.info("step %d validation: %s in %.1fs", step, describe(metrics), time.perf_counter() - t0)
        self.tb.add(step, {f"val/{k}": v for k, v in metrics.items()})
        self.tb.flush()
        return metrics

    def save(self, step: int, state: Dict[str, Any]) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.tb.flush()  # the points up to this step reach the disk before the checkpoint commits
        client = {**state, "global_step": step, "run_id": self.run_id, **self.shape.record(),  # resume.check reads these
                  "samples_per_rank_done": state["step_in_epoch"] * cfg.ds.micro_batch * cfg.ds.grad_accum}
        tag = checkpoint.save(self.engine, cfg.checkpoint_dir, step, client, cfg.keep_last)
        log.info("saved checkpoint %s in %.1fs", cfg.checkpoint_dir / tag, time.perf_counter() - t0)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
