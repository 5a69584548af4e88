"""Rank worker: the sigmoid loss through real DeepSpeed engines (ZeRO 0, fp32, no clipping) and
engine.train.step.ContrastiveStep on 2 gloo ranks, against one process on the whole (doubled) batch.

The oracle: a model with SigLIP's logit bias, the dense sigmoid loss of all 16 rows in one process
(models.sigmoid_loss.dense_sigmoid_loss: the whole logit matrix, no chunks, no ranks), its gradient.
The engine, for: one micro-batch of 8 per rank (ring), GradCache accumulation k=2 (micro-batches of 4;
ring and gather; local and global; chunks of 3 rows), and plain accumulation, which must NOT match.
Results go to OUT/rank{r}.json (the test asserts).

usage: engine_sigmoid.py DATA_DIR OUT_DIR
"""
import copy
import json
import sys
from pathlib import Path

import torch

from engine import dist
from engine.train.step import ContrastiveStep
from models import build_clip
from models.sigmoid_loss import SigmoidLoss, dense_sigmoid_loss
from tests.dist.workers.engine_common import join_two_ranks, open_test_pairs, stack_rows
from tests.dist.workers.engine_loss import flat_grads, make_engine, rel_err

WORLD_ROWS = 16


def main(data_dir: str, out_dir: str) -> None:
    rank, world = join_two_ranks(), 2
    tok, store, ds = open_test_pairs(data_dir)
    pixels, ids = stack_rows([ds[i] for i in range(WORLD_ROWS)], store)

    torch.manual_seed(0)
    ref = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=len(tok.get_vocab()))
    ref.start_sigmoid_logits()
    with torch.no_grad():  # a bias and scale where both the positive and negative terms matter
        ref.logit_bias.fill_(-2.0)
    init = copy.deepcopy(ref.state_dict())
    out = ref(pixels, ids)
    loss_ref = dense_sigmoid_loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    loss_ref.backward()
    g_ref = flat_grads(ref)
    results = {"loss_ref": loss_ref.item(), "bias_grad_ref": ref.logit_bias.grad.item()}

    per_rank = WORLD_ROWS // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for name, how, local, gas, exact, chunk in [
            ("ring_k1", "ring", True, 1, True, None), ("ring_exact_k2", "ring", True, 2, True, None),
            ("gather_exact_k2", "gather", True, 2, True, 3), ("ring_global_exact_k2", "ring", False, 2, True, 3),
            ("ring_plain_k2", "ring", True, 2, False, None)]:
        model = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=len(tok.get_vocab()))
        model.add_logit_bias()
        model.load_state_dict(init)
        engine = make_engine(model, per_rank // gas, gas)
        loss_fn = SigmoidLoss(lambda t, f, g, how=how: dist.visit_blocks(t, f, g, how=how), rank, chunk,
                              local_loss=local, sum_ranks=dist.all_reduce_sum_with_grad, world_size=world)
        box = {}

        def read_grads():
            box["g"], box["bias"] = flat_grads(engine.module), engine.module.logit_bias.grad.item()

        stepper = ContrastiveStep(engine, loss_fn, gas, exact=exact, before_last_step=read_grads)
        px, tx = pixels[mine], ids[mine]
        m = per_rank // gas
        res = stepper.run([(px[j * m:(j + 1) * m], tx[j * m:(j + 1) * m]) for j in range(gas)])
        results[name] = {"grad_rel_err": rel_err(box["g"], g_ref), "loss": res.loss,
                         "bias_grad": box["bias"]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    dist.exit_process(0)
