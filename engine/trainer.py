"""The training run: data, model, DeepSpeed engine, the step loop, validation, checkpoints, export.

Run state is explicit (the Trainer's fields and the checkpoint's client_state), never stored back
into argparse. Every collective goes through engine.dist; only rank 0 writes logs/TensorBoard.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import sys
import time
from typing import Any, Dict, Optional

import numpy as np
import torch

from data.files import InputError
from engine import checkpoint, dist
from engine.accumulation import ContrastiveStep
from engine.config import TrainConfig, write_config
from engine.logging import ScalarWriter, setup_logging
from engine.optim import build_optimizer, param_groups, scheduler_factory

log = logging.getLogger("clip")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _test_fault(step: int) -> None:
    """Test hook: CLIP_TEST_DIE_AT_STEP=N [CLIP_TEST_DIE_RANK=r] [CLIP_TEST_DIE_HOW=exit|kill] ends
    this rank right after optimizer step N (after any checkpoint of that step), like a crash."""
    at = os.environ.get("CLIP_TEST_DIE_AT_STEP")
    if not at or int(at) != step:
        return
    who = os.environ.get("CLIP_TEST_DIE_RANK")
    if who is not None and int(who) != dist.rank():
        return
    if os.environ.get("CLIP_TEST_DIE_HOW", "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.engine = None
        self.tb: Optional[ScalarWriter] = None
        self.val = None  # (store, queries) of the validation split

    # --- building ---------------------------------------------------------------------------------

    def _build_data(self):
        from data.datasets import PairDataset
        from data.lmdb_store import ImageStore
        from data.pairs import check_ids_present, read_queries, training_pairs
        from data.tokenizer import load_tokenizer

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.vocab)
        self.store = ImageStore(cfg.train_img)
        queries = read_queries(cfg.train_data)
        check_ids_present(queries, self.store, cfg.train_data)
        pairs = training_pairs(queries)
        self.dataset = PairDataset(pairs, self.store, self.tokenizer, cfg.context_length)
        if cfg.val_data:
            vstore = ImageStore(cfg.val_img)
            vqueries = read_queries(cfg.val_data)
            check_ids_present(vqueries, vstore, cfg.val_data)
            self.val = (vstore, vqueries)
        log.info("train: %d pairs from %s, images %s (%d px)", len(pairs), cfg.train_data, cfg.train_img,
                 self.store.resolution)

    def _vocab_size(self) -> Optional[int]:
        """The tokenizer's size when the text config says otherwise (the tiny/demo configs and a
        synthetic vocabulary); None when they agree."""
        from models import load_text_config

        cfg = self.cfg
        n_tok = len(self.tokenizer.get_vocab())
        n_cfg = load_text_config(cfg.text_model).vocab_size
        if n_tok == n_cfg:
            return None
        log.info("text vocab: %d tokens from %s (config %s says %d)", n_tok, cfg.vocab, cfg.text_model, n_cfg)
        self._vocab_note = (f"--vocab {cfg.vocab} has {n_tok} tokens but --text-model {cfg.text_model} has "
                            f"vocab_size {n_cfg}: pretrained text weights need the tokenizer that came with them")
        return n_tok

    def _load_weights(self, model) -> None:
        from models import convert

        cfg = self.cfg
        try:
            if cfg.init_from:
                log.info("init: %s", convert.load_pretrained_clip(model, cfg.init_from))
            if cfg.clip_weight_path:
                log.info("image tower: %s", convert.load_image_tower(model, cfg.clip_weight_path))
            if cfg.bert_weight_path:
                log.info("text tower: %s", convert.load_text_tower(model, cfg.bert_weight_path))
        except InputError as e:  # WeightConversionError is one; add the likely cause
            note = getattr(self, "_vocab_note", None)
            raise InputError(f"{e}\n({note})" if note else str(e)) from None

    def _build_model(self):
        from models import build_clip, load_text_config

        cfg = self.cfg
        max_pos = load_text_config(cfg.text_model).max_position_embeddings
        if cfg.context_length > max_pos:
            raise InputError(f"--context-length {cfg.context_length} exceeds the text model's "
                             f"max_position_embeddings {max_pos}")
        model = build_clip(cfg.model, cfg.text_model, grad_checkpointing=cfg.grad_checkpointing,
                           vocab_size=self._vocab_size())
        if model.image_resolution != self.store.resolution:
            raise InputError(f"--train-img {cfg.train_img} holds {self.store.resolution} px images but "
                             f"--model {cfg.model} expects {model.image_resolution} px; rebuild the LMDB "
                             f"with launch/build_lmdb.py --resolution {model.image_resolution}")
        if self.val and self.val[0].resolution != model.image_resolution:
            raise InputError(f"--val-img {cfg.val_img} holds {self.val[0].resolution} px images, the model "
                             f"expects {model.image_resolution} px")
        if not cfg.resume:  # a resumed run takes every weight from its checkpoint
            self._load_weights(model)
        if cfg.freeze_image_tower:
            model.freeze_image_tower()
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model %s + %s: %.2fM parameters, %.2fM trainable", cfg.model, cfg.text_model,
                 n_all / 1e6, n_train / 1e6)
        return model

    def _build_engine(self, model, total_steps: int):
        import deepspeed

        cfg = self.cfg
        on_gpu = torch.cuda.is_available()
        if on_gpu:  # the optimizer should see the parameters where they will live
            model.to(dist.device())
        optimizer, opt_name = build_optimizer(param_groups(model, cfg.wd), cfg.lr, on_gpu,
                                              cfg.ds.offload_optimizer)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=scheduler_factory(cfg.warmup, total_steps),
                                               config=cfg.ds.for_engine(), dist_init_required=False)
        micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        if (micro, gas) != (cfg.ds.micro_batch, cfg.ds.grad_accum):
            raise RuntimeError(f"DeepSpeed resolved micro batch {micro} x accumulation {gas}, expected "
                               f"{cfg.ds.micro_batch} x {cfg.ds.grad_accum} from {cfg.ds.path}")
        self.opt_name = opt_name
        return engine

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        dist.init_distributed(use_deepspeed=True, timeout_s=cfg.dist_timeout, always=True)
        if dist.world_size() != cfg.world_size:
            raise RuntimeError(f"validated for world size {cfg.world_size}, joined {dist.world_size()}")
        # A default run name is a timestamp: take rank 0's so all ranks write one run dir.
        cfg = self.cfg = dataclasses.replace(cfg, name=dist.broadcast_object(cfg.name))
        main = dist.is_main()
        setup_logging(cfg.run_dir if main else None, dist.rank())
        log.info("run dir %s; world size %d; DeepSpeed config %s (ZeRO %d, %s)", cfg.run_dir, cfg.world_size,
                 cfg.ds.path, cfg.ds.zero_stage, cfg.ds.precision)
        self.tb = ScalarWriter(cfg.run_dir / "tensorboard" if main else None)

        seed_all(cfg.seed)  # the same initial weights on every rank
        self._build_data()
        model = self._build_model()
        micro, gas = cfg.ds.micro_batch, cfg.ds.grad_accum
        from data.sampler import ShardedSampler

        sampler = ShardedSampler(len(self.dataset), dist.rank(), cfg.world_size, seed=cfg.seed, shuffle=True)
        steps_per_epoch = sampler.samples_per_rank // (micro * gas)
        if steps_per_epoch == 0:
            raise InputError(f"{cfg.train_data}: {len(self.dataset)} pairs are fewer than one global batch "
                             f"({cfg.ds.global_batch} = micro {micro} x accumulation {gas} x {cfg.world_size} "
                             f"ranks); lower the batch size in {cfg.ds.path}")
        total_steps = cfg.epochs * steps_per_epoch
        self.engine = engine = self._build_engine(model, total_steps)
        self.device = dist.device()
        self.dtype = _DTYPES[cfg.ds.precision]

        epoch, start_step = 0, 0
        if cfg.resume:
            epoch, start_step = self._resume(steps_per_epoch)
        else:
            seed_all(cfg.seed + 1009 * dist.rank())  # per-rank dropout streams
        end_step = total_steps if not cfg.max_steps else min(total_steps, cfg.max_steps)

        if main:
            write_config(cfg, {"micro_batch": micro, "grad_accum": gas, "global_batch": cfg.ds.global_batch,
                               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                               "end_step": end_step, "optimizer": self.opt_name, "train_pairs": len(self.dataset),
                               "deepspeed_config": cfg.ds.raw})
        log.info("%d steps/epoch x %d epochs = %d steps (running to %d); global batch %d = %d x %d x %d ranks; "
                 "loss %s, accumulation %s; optimizer %s", steps_per_epoch, cfg.epochs, total_steps, end_step,
                 cfg.ds.global_batch, micro, gas, cfg.world_size, "local" if cfg.local_loss else "global",
                 ("exact" if cfg.accumulation == "exact" else "plain") if gas > 1 else "none", self.opt_name)

        summary = self._loop(sampler, steps_per_epoch, epoch, start_step, end_step)
        if cfg.export:
            out = checkpoint.export_fp32(engine, cfg.run_dir / "model_fp32.pt")
            if out:
                log.info("exported the consolidated fp32 state dict to %s", out)
        return summary

    def _resume(self, steps_per_epoch: int):
        cfg = self.cfg
        load_dir, tag = checkpoint.resolve(cfg.resume, cfg.checkpoint_dir)
        state = checkpoint.load(self.engine, load_dir, tag)
        expect = {"world_size": cfg.world_size, "micro_batch": cfg.ds.micro_batch,
                  "grad_accum": cfg.ds.grad_accum, "train_pairs": len(self.dataset)}
        diff = {k: (state.get(k), v) for k, v in expect.items() if state.get(k) != v}
        if diff:
            raise InputError(f"--resume {load_dir / tag}: saved with " +
                             ", ".join(f"{k}={a}" for k, (a, _) in diff.items()) + ", now " +
                             ", ".join(f"{k}={b}" for k, (_, b) in diff.items()) +
                             "; an exact resume needs the same data, world size and batch config (start a "
                             "new run with --init-from <run>/model_fp32.pt to change them)")
        epoch, step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        log.info("resumed from %s: step %d, epoch %d, %d steps into it", load_dir / tag,
                 self.engine.global_steps, epoch, step_in_epoch)
        return epoch, step_in_epoch

    def _loader(self, sampler, epoch: int, start_step: int):
        cfg = self.cfg
        micro, gas = cfg.ds.micro_batch, cfg.ds.grad_accum
        sampler.set_epoch(epoch, start=start_step * micro * gas)
        # Its own generator: creating a loader must not draw from the global RNG (exact resume).
        g = torch.Generator()
        g.manual_seed(cfg.seed + epoch)
        return torch.utils.data.DataLoader(self.dataset, batch_size=micro, sampler=sampler, drop_last=True,
                                           num_workers=cfg.num_workers, generator=g,
                                           pin_memory=torch.cuda.is_available(),
                                           persistent_workers=False)

    def _prepare(self, batch):
        from data.images import normalize_uint8

        pixels = batch["image"].to(self.device, non_blocking=True)
        pixels = normalize_uint8(pixels, self.store.mean, self.store.std, dtype=self.dtype)
        return pixels, batch["input_ids"].to(self.device, non_blocking=True)

    def _loop(self, sampler, steps_per_epoch: int, epoch: int, start_step: int, end_step: int) -> Dict[str, Any]:
        from tqdm import tqdm
        from models import ClipLoss

        cfg, engine = self.cfg, self.engine
        gas = cfg.ds.grad_accum
        loss_fn = ClipLoss(gather=dist.all_gather_with_grad, rank=dist.rank(), local_loss=cfg.local_loss)
        own_norm = cfg.ds.zero_stage == 0 and cfg.ds.precision == "fp32"  # DeepSpeed does not report it
        norm_box = {}

        def grad_norm_before_step():
            if own_norm:
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                norm_box["norm"] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item() if grads else 0.0

        stepper = ContrastiveStep(engine, loss_fn, gas, exact=cfg.accumulation == "exact",
                                  prepare=self._prepare, step_index=lambda: engine.global_steps,
                                  before_last_step=grad_norm_before_step)
        engine.train()
        step = engine.global_steps
        # The bar is for a person watching rank 0; in a log file the log lines say the same.
        bar = tqdm(total=end_step, initial=step, disable=not (dist.is_main() and sys.stderr.isatty()),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
        last: Dict[str, Any] = {}
        state: Optional[Dict[str, int]] = None  # where the data stream stands after the last step
        # Throughput counts data loading + forward/backward/step only, not validation or saving.
        win_time, win_steps, win_loss = 0.0, 0, 0.0
        last_saved = last_val = -1
        try:
            while step < end_step and epoch < cfg.epochs:
                it = iter(self._loader(sampler, epoch, start_step))
                for step_in_epoch in range(start_step, steps_per_epoch):
                    lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves it on after)
                    t0 = time.perf_counter()
                    result = stepper.run([next(it) for _ in range(gas)])
                    win_time += time.perf_counter() - t0
                    step = engine.global_steps
                    state = {"epoch": epoch, "step_in_epoch": step_in_epoch + 1}
                    win_steps, win_loss = win_steps + 1, win_loss + result.loss
                    last = {"loss": result.loss, "logit_scale": result.logit_scale}
                    if not engine.was_step_applied():
                        log.warning("step %d: fp16 gradient overflow, update skipped (loss scale now %s)",
                                    step, self._loss_scale())
                    bar.update(1)
                    if step % cfg.log_every_steps == 0 or step == end_step:
                        self._log_step(step, end_step, epoch, win_loss / win_steps, lr, result.logit_scale,
                                       norm_box.get("norm"), win_steps, win_time)
                        win_time, win_steps, win_loss = 0.0, 0, 0.0
                    end_of_epoch = step_in_epoch + 1 == steps_per_epoch
                    val_due = step % cfg.val_every_steps == 0 if cfg.val_every_steps else end_of_epoch
                    if val_due:
                        self.validate(step)
                        last_val = step
                    if ((cfg.save_every_steps and step % cfg.save_every_steps == 0) or
                            (end_of_epoch and cfg.save_frequency and (epoch + 1) % cfg.save_frequency == 0)):
                        self.save(step, state)
                        last_saved = step
                    _test_fault(step)
                    if step >= end_step:
                        break
                del it
                epoch, start_step = epoch + 1, 0
        finally:
            bar.close()
        # The final state is always kept when checkpoints are on (also when --max-steps cut it short).
        if state is not None and (cfg.save_frequency or cfg.save_every_steps) and last_saved != step:
            self.save(step, state)
        if state is not None and last_val != step:  # the run's final score, wherever it stopped
            self.validate(step)
        self.tb.flush()
        return {"step": step, "epoch": epoch, **last}

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
        log.info("step %d/%d epoch %d loss %.4f lr %.3g logit_scale %.2f grad_norm %s %.1f samples/s%s",
                 step, end_step, epoch, loss, lr, logit_scale,
                 f"{norm:.3g}" if norm is not None else "n/a", samples_s or 0.0,
                 f" loss_scale {scale16:g}" if scale16 is not None else "")
        self.tb.add(step, {"train/loss": loss, "train/lr": lr, "train/logit_scale": logit_scale,
                           "train/grad_norm": norm, "train/loss_scale": scale16,
                           "train/samples_per_s": samples_s, "train/step_time_s": step_time})

    def validate(self, step: int) -> Optional[Dict[str, float]]:
        """Full-pool recall both ways on the validation split (every rank takes part)."""
        if self.val is None:
            return None
        from engine.evaluation import describe, evaluate_both_directions

        cfg, engine = self.cfg, self.engine
        store, queries = self.val
        module = engine.module
        t0 = time.perf_counter()
        module.eval()
        try:
            with torch.no_grad(), self._full_root_params():
                metrics = evaluate_both_directions(module, store, queries, self.tokenizer, cfg.context_length,
                                                   cfg.ds.micro_batch * 2, self.device, k=10)
        finally:
            module.train()
        log.info("step %d validation: %s in %.1fs", step, describe(metrics), time.perf_counter() - t0)
        self.tb.add(step, {f"val/{k}": v for k, v in metrics.items()})
        return metrics

    def _full_root_params(self):
        """Under ZeRO-3, the parameters held directly by the CLIP module (text_projection,
        logit_scale) are only gathered inside its forward; encode_text/encode_image called on their
        own need them gathered (submodules gather theirs through their hooks)."""
        import contextlib

        if self.cfg.ds.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters(recurse=False)))

    def save(self, step: int, state: Dict[str, Any]) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        client = {**state, "global_step": step, "world_size": cfg.world_size, "micro_batch": cfg.ds.micro_batch,
                  "grad_accum": cfg.ds.grad_accum, "train_pairs": len(self.dataset),
                  "samples_per_rank_done": state["step_in_epoch"] * cfg.ds.micro_batch * cfg.ds.grad_accum}
        tag = checkpoint.save(self.engine, cfg.checkpoint_dir, step, client, cfg.keep_last)
        log.info("saved checkpoint %s in %.1fs", cfg.checkpoint_dir / tag, time.perf_counter() - t0)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
