"""Layer-wise learning-rate decay (engine.train.optim.param_groups with layer_decay): the learning
rate every parameter gets from the real optimizer and schedule equals a table computed by hand for
the tiny model (2 image blocks, 2 text layers: depth 3 in each tower), weight decay keeps its
exemptions, and TensorBoard gets one scalar per tower layer."""
import pytest
import torch

from engine.train.optim import build_optimizer, param_groups, scheduler_factory, tower_lr_scalars
from models import build_clip

LR = 1e-3
# lr x d^(3 - layer): image d = 0.5, text d = 0.25; layer 0 = embeddings, 3 = after the last block
HAND = [("visual.conv1.", 1.25e-4), ("visual.class_embedding", 1.25e-4), ("visual.positional_embedding", 1.25e-4),
        ("visual.ln_pre.", 1.25e-4), ("visual.transformer.resblocks.0.", 2.5e-4),
        ("visual.transformer.resblocks.1.", 5e-4), ("visual.ln_post.", 1e-3), ("visual.proj", 1e-3),
        ("bert.embeddings.", 1.5625e-5), ("bert.encoder.layer.0.", 6.25e-5), ("bert.encoder.layer.1.", 2.5e-4),
        ("text_projection", 1e-3), ("logit_scale", 1e-3), ("logit_bias", 1e-3)]


def hand_lr(name):
    (rate,) = [r for prefix, r in HAND if name.startswith(prefix)]
    return rate


def test_per_parameter_learning_rates_equal_the_hand_table():
    torch.manual_seed(0)
    model = build_clip("ViT-tiny-test", "BERT-tiny-test")
    model.add_logit_bias()
    groups = param_groups(model, 0.1, {"image": 0.5, "text": 0.25})
    opt, _ = build_optimizer(groups, LR, on_gpu=False, offload=False)
    scheduler_factory(warmup=0, total_steps=100)(opt)  # the schedule as the trainer builds it, at step 0
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = [n for n, _ in model.named_parameters()]
    assert len(lr_of) == len(names)
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(hand_lr(name), rel=1e-12), name
        exempt = p.ndim < 2 or "embedding" in name or "norm" in name or "logit" in name
        assert wd_of[id(p)] == (0.0 if exempt else 0.1), name
    assert opt.param_groups[0]["lr"] == LR  # group 0 (the logit scale's) reads as the run's lr in the log


def test_no_decay_keeps_the_two_groups():
    model = build_clip("ViT-tiny-test", "BERT-tiny-test")
    for decay in (None, {"image": 1.0, "text": 1.0}):
        assert [g["name"] for g in param_groups(model, 0.1, decay)] == ["decay", "no_decay"]
        assert tower_lr_scalars(param_groups(model, 0.1, decay), [LR, LR]) == {}


def test_tensorboard_gets_each_tower_layers_rate():
    model = build_clip("ViT-tiny-test", "BERT-tiny-test")
    groups = param_groups(model, 0.1, {"image": 0.5, "text": 0.25})
    lrs = [LR * g["lr_scale"] for g in groups]
    scalars = tower_lr_scalars(groups, lrs)
    assert scalars["train/lr_image/L00"] == pytest.approx(1.25e-4)
    assert scalars["train/lr_text/L02"] == pytest.approx(2.5e-4)
    assert {k.rsplit("/", 1)[1] for k in scalars if "image" in k} == {"L00", "L01", "L02", "L03"}
