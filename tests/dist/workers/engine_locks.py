"""Rank worker: locked towers through real DeepSpeed engines (ZeRO 1 and 2, fp32) on 2 gloo ranks.

The model is locked as the trainer locks it (engine.train.recipe.apply_locks: image tower with its
last block unlocked, text tower with its projection only), its parameter groups made as the trainer
makes them (layer-wise lr decay on), and a few steps of the sigmoid loss with exact accumulation
taken. Recorded per rank in OUT/rank{r}.json: whether every frozen parameter is bit-identical to the
start and every trainable one moved, and the elements of optimizer state this rank holds (Adam's
exp_avg and the fp32 master partition), to be summed over ranks by the test.

usage: engine_locks.py DATA_DIR OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

from engine import dist
from engine.train.optim import build_optimizer, param_groups
from engine.train.recipe import apply_locks, prepare_logits
from engine.train.recipe_settings import RecipeSettings
from engine.train.step import ContrastiveStep
from models import SigmoidLoss, build_clip
from tests.dist.workers.engine_common import join_two_ranks, open_test_pairs, stack_rows


def adam_and_master_elements(engine):
    inner = engine.optimizer
    while hasattr(inner, "optimizer"):  # ZeRO wrappers hold the torch optimizer inside
        inner = inner.optimizer
    adam = sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)
    master = sum(p.numel() for g in inner.param_groups for p in g["params"])
    return adam, master


def main(data_dir: str, out_dir: str) -> None:
    import deepspeed

    rank = join_two_ranks()
    tok, store, ds = open_test_pairs(data_dir)
    recipe = RecipeSettings(loss="siglip", lock_image=True, lock_image_unlocked_layers=1, lock_text=True,
                            image_lr_decay=0.8, text_lr_decay=0.9)
    results = {}
    for stage in (1, 2):
        torch.manual_seed(0)
        model = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=len(tok.get_vocab()))
        prepare_logits(model, recipe.loss)
        apply_locks(model, recipe)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        trains = {n for n, p in model.named_parameters() if p.requires_grad}
        opt, _ = build_optimizer(param_groups(model, 0.1, {"image": 0.8, "text": 0.9}), 1e-2, False, False)
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
               "zero_optimization": {"stage": stage, "overlap_comm": False}, "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
        stepper = ContrastiveStep(engine, SigmoidLoss(dist.visit_blocks, rank, None), 2)
        for step in range(3):
            px, ids = stack_rows([ds[(step * 16 + rank * 8 + i) % len(ds)] for i in range(8)], store)
            stepper.run([(px[:4], ids[:4]), (px[4:], ids[4:])])
        now = dict(engine.module.named_parameters())
        adam, master = adam_and_master_elements(engine)
        results[f"zero{stage}"] = {
            "frozen_identical": all(torch.equal(now[n].detach(), start[n]) for n in start if n not in trains),
            "frozen_count": len(start) - len(trains),
            "trainable_moved": [n for n in trains if not torch.equal(now[n].detach(), start[n])],
            "trainable": sorted(trains),
            "trainable_elements": sum(start[n].numel() for n in trains),
            "all_elements": sum(t.numel() for t in start.values()),
            "adam_elements": adam, "master_elements": master}
        del engine, stepper, opt
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    dist.exit_process(0)
