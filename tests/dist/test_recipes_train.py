"""The recipes through the real trainer (launch/train.py) on 2 gloo ranks:
- a locked image tower with its last block unlocked, layer-wise lr decay and the sigmoid loss (global,
  in chunks, exact accumulation) on ZeRO-2: the frozen weights come out bit-identical, the unlocked
  ones moved, the export carries the logit bias, the log lists the parameter groups and TensorBoard
  has each tower layer's learning rate;
- distillation from the first run's export: the teacher's memory and time are in the log, the two
  loss terms in TensorBoard;
- the sigmoid loss in bf16 on ZeRO-3 with exact accumulation trains (its own process: ZeRO-3)."""
import torch

from engine.run.log import read_scalars
from models import build_clip
from models.weights.model_file import read_model_file
from tests.dist.workers.engine_common import REPO, make_data, write_ds
from tests.ranks import assert_all_ok, run_ranks

WORKER = str(REPO / "tests/dist/workers/engine_runs.py")
COMMON = "--max-steps,3,--export,--save-frequency,0,--lr,5e-3,--warmup,1"


def test_recipes_through_the_trainer(tmp_path):
    make_data(tmp_path / "data")
    logs = tmp_path / "runs"
    z2 = write_ds(tmp_path / "z2.json", stage=2, micro=4, gas=2)
    z0 = write_ds(tmp_path / "z0.json", stage=0, micro=8)
    z3 = write_ds(tmp_path / "z3.json", stage=3, micro=4, gas=2, precision="bf16")
    locked = (f"locked:{z2}:{COMMON},--loss,siglip,--global-loss,--sigmoid-chunk,3,--lock-image,"
              "--lock-image-unlocked-layers,1,--image-lr-decay,0.5,--text-lr-decay,0.25")
    distill = f"distill:{z0}:{COMMON},--distill-from,{logs / 'locked' / 'model_fp32.pt'},--distill-weight,0.5"
    assert_all_ok(run_ranks([WORKER, str(tmp_path / "data"), str(logs), locked, distill], timeout=600))
    assert_all_ok(run_ranks([WORKER, str(tmp_path / "data"), str(logs),
                             f"sig3:{z3}:{COMMON},--loss,siglip,--sigmoid-chunk,2"], timeout=600))

    state = read_model_file(logs / "locked" / "model_fp32.pt")[0]
    torch.manual_seed(123)  # the trainer's default seed: its initial weights
    start = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=state["bert.embeddings.word_embeddings.weight"]
                       .shape[0]).state_dict()
    unlocked = ("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj")
    frozen = [k for k in start if k.startswith("visual.") and not k.startswith(unlocked)]
    assert frozen and all(torch.equal(state[k], start[k]) for k in frozen)
    assert all(not torch.equal(state[k], start[k]) for k in start if k.startswith(unlocked))
    assert state["logit_bias"].shape == (1,) and -10.5 < state["logit_bias"].item() < -9.5
    log = (logs / "locked" / "train.log").read_text()
    # the groups: the locked image layers have none; the text embeddings learn at lr x 0.25^3
    assert "image tower locked" in log and "image.L02.decay" in log and "image.L01" not in log
    assert "text.L00.no_decay" in log and "(x0.01562)" in log
    scalars = read_scalars(logs / "locked" / "tensorboard")
    assert scalars["train/lr_image/L03"][0][1] == scalars["train/lr"][0][1]
    assert abs(scalars["train/lr_text/L00"][0][1] / scalars["train/lr"][0][1] - 0.25 ** 3) < 1e-9

    log = (logs / "distill" / "train.log").read_text()
    assert "distillation teacher" in log and "MB in float32 on cpu" in log  # its memory, at the start
    steps = [line for line in log.splitlines() if " INFO step " in line and "validation" not in line]
    assert len(steps) == 3 and all(" s/step (" in line and " distill " in line for line in steps)  # its time
    scalars = read_scalars(logs / "distill" / "tensorboard")
    assert {"train/loss_contrastive", "train/loss_distill", "train/teacher_s_per_step"} <= set(scalars)
    total, parts = scalars["train/loss"][-1][1], (scalars["train/loss_contrastive"][-1][1],
                                                  scalars["train/loss_distill"][-1][1])
    assert abs(total - (parts[0] + 0.5 * parts[1])) < 1e-4, (total, parts)

    sig3 = read_model_file(logs / "sig3" / "model_fp32.pt")[0]
    assert torch.isfinite(sig3["logit_bias"]).all() and sig3["logit_bias"].item() != -10.0
    losses = [v for _, v in read_scalars(logs / "sig3" / "tensorboard")["train/loss"]]
    assert len(losses) == 3 and all(0 < v < 50 for v in losses)
