"""Rank worker: the engine's gathered contrastive gradients against a single-process oracle.

Every rank builds the same tiny CLIP and computes the oracle itself: the loss and gradient of one
process on the whole concatenated batch (no DeepSpeed, no gather). Then, through real DeepSpeed
engines (ZeRO 0, fp32, no clipping) and engine.train.step.ContrastiveStep, it reads the gradient
that the optimizer would apply (after DeepSpeed's averaging over ranks and accumulation) for:
  local / global loss with one micro-batch per rank,
  exact accumulation (k=2 micro-batches of half the size), local and global,
  plain accumulation (k=2), which must NOT match (fewer negatives).
It also checks, with dropout switched on, that exact accumulation's second pass reproduces the first
pass's features bit for bit (the RNG replay). Results go to OUT/rank{r}.json; the test asserts.

usage: engine_loss.py DATA_DIR OUT_DIR
"""
import copy
import json
import sys
from pathlib import Path

import torch

from engine import dist
from engine.train.step import ContrastiveStep
from models import ClipLoss, build_clip, load_text_config
from tests.dist.workers.engine_common import join_two_ranks, open_test_pairs, stack_rows

WORLD_ROWS = 16  # the global batch: 2 ranks x 8 rows, or 2 ranks x 2 micro-batches x 4 rows


def flat_grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                      for p in model.parameters()])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_engine(model, micro, gas):
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # we read gradients, never move weights
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    return engine


class Recorder:
    """Wraps an engine and keeps every forward's outputs, to compare pass 1 with pass 2."""

    def __init__(self, engine):
        self.engine, self.outputs = engine, []

    def __call__(self, *a):
        out = self.engine(*a)
        self.outputs.append({k: v.detach().clone() for k, v in out.items()})
        return out

    def backward(self, loss):
        return self.engine.backward(loss)

    def step(self):
        return self.engine.step()


def main(data_dir: str, out_dir: str) -> None:
    rank, world = join_two_ranks(), 2
    tok, store, ds = open_test_pairs(data_dir)
    pixels, ids = stack_rows([ds[i] for i in range(WORLD_ROWS)], store)

    torch.manual_seed(0)
    ref = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=len(tok.get_vocab()))
    init = copy.deepcopy(ref.state_dict())

    # the oracle: one process, the whole batch, no gather
    out = ref(pixels, ids)
    loss_ref = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss_ref.backward()
    g_ref = flat_grads(ref)

    results = {"loss_ref": loss_ref.item()}
    per_rank = WORLD_ROWS // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for name, local, gas, exact in [("local", True, 1, True), ("global", False, 1, True),
                                    ("local_exact_k2", True, 2, True), ("global_exact_k2", False, 2, True),
                                    ("local_plain_k2", True, 2, False)]:
        model = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=len(tok.get_vocab()))
        model.load_state_dict(init)
        engine = make_engine(model, per_rank // gas, gas)
        loss_fn = ClipLoss(gather=dist.all_gather_with_grad, rank=rank, local_loss=local)
        box = {}
        stepper = ContrastiveStep(engine, loss_fn, gas, exact=exact,
                                  before_last_step=lambda: box.setdefault("g", flat_grads(engine.module)))
        px, tx = pixels[mine], ids[mine]
        m = per_rank // gas
        micro = [(px[j * m:(j + 1) * m], tx[j * m:(j + 1) * m]) for j in range(gas)]
        res = stepper.run(micro)
        results[name] = {"grad_rel_err": rel_err(box["g"], g_ref), "loss": res.loss,
                         "grad_norm": box["g"].norm().item()}

    # dropout on: pass 2 of exact accumulation must see the same masks as pass 1
    text_cfg = load_text_config("BERT-tiny-test", vocab_size=len(tok.get_vocab()))
    text_cfg.hidden_dropout_prob = text_cfg.attention_probs_dropout_prob = 0.2
    torch.manual_seed(1)
    model = build_clip("ViT-tiny-test", text_cfg)
    engine = make_engine(model, per_rank // 2, 2)
    rec = Recorder(engine)
    stepper = ContrastiveStep(rec, ClipLoss(gather=dist.all_gather_with_grad, rank=rank), 2, exact=True)
    torch.manual_seed(100 + rank)
    m = per_rank // 2
    stepper.run([(pixels[mine][j * m:(j + 1) * m], ids[mine][j * m:(j + 1) * m]) for j in range(2)])
    first, second = rec.outputs[:2], rec.outputs[2:]
    results["dropout_replay_equal"] = all(torch.equal(a["text_features"], b["text_features"])
                                          for a, b in zip(first, second))
    # and the masks really differ between micro-batches/draws (else the check above proves nothing):
    again = model.encode_text(ids[mine][:m])
    results["dropout_active"] = not torch.equal(again, first[0]["text_features"])

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    dist.exit_process(0)
