"""AdamW parameter groups (which tensors escape weight decay) and the warmup + cosine schedule."""
import copy
import math

import pytest
import torch

from engine.train.optim import BETAS, WarmupCosine, build_optimizer, param_groups, scheduler_factory
from models import build_clip
from models.towers import lock_tower


@pytest.fixture(scope="module")
def model():
    return build_clip("ViT-tiny-test", "BERT-tiny-test")


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_decay_on_biases_norms_embeddings_and_logit_scale(model):
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    decay, exempt = _names(model, groups["decay"]), _names(model, groups["no_decay"])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    for name in ["logit_scale", "visual.class_embedding", "visual.positional_embedding",
                 "visual.ln_pre.weight", "visual.transformer.resblocks.0.ln_1.weight",
                 "visual.transformer.resblocks.0.attn.in_proj_bias", "bert.embeddings.word_embeddings.weight",
                 "bert.embeddings.position_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                 "bert.encoder.layer.0.attention.output.LayerNorm.weight",
                 "bert.encoder.layer.1.attention.self.query.bias"]:
        assert name in exempt, name
    for name in ["text_projection", "visual.proj", "visual.conv1.weight",
                 "visual.transformer.resblocks.1.attn.in_proj_weight", "visual.transformer.resblocks.0.mlp.c_fc.weight",
                 "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight"]:
        assert name in decay, name
    # every trainable parameter in exactly one group
    assert decay.isdisjoint(exempt)
    assert decay | exempt == {n for n, _ in model.named_parameters()}


def test_frozen_image_tower_is_left_out():
    m = build_clip("ViT-tiny-test", "BERT-tiny-test")
    lock_tower(m, "image", lock_projection=True)  # what --freeze-image-tower asks (engine.train.recipe)
    names = set().union(*(_names(m, g) for g in param_groups(m, 0.1)))
    assert not any(n.startswith("visual.") for n in names)
    assert "text_projection" in names and "logit_scale" in names


def test_cpu_optimizer_is_torch_adamw_with_the_groups(model):
    opt, name = build_optimizer(param_groups(model, 0.05), lr=1e-3, on_gpu=False, offload=False)
    assert isinstance(opt, torch.optim.AdamW) and "torch" in name
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == BETAS and opt.param_groups[0]["lr"] == 1e-3


def test_cpu_optimizer_steps_like_torch_reference_adamw(model):
    """The fused CPU kernel we pick must update exactly as torch's single-tensor AdamW would."""
    twin = copy.deepcopy(model)
    opt, name = build_optimizer(param_groups(model, 0.05), lr=1e-3, on_gpu=False, offload=False)
    assert opt.defaults["fused"] and "fused" in name
    ref = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in param_groups(twin, 0.05)],
                            lr=1e-3, betas=BETAS, eps=opt.defaults["eps"], foreach=False)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # every tensor moved


def test_warmup_then_cosine():
    f = WarmupCosine(warmup=10, total=110)
    assert f(0) == pytest.approx(0.1)  # the first update is not at lr 0
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(500) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    tail = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(tail, tail[1:]))
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert WarmupCosine(0, 100)(0) == pytest.approx(1.0)
    assert WarmupCosine(5, 5)(7) == 1.0  # no room for a cosine: hold the peak


def test_scheduler_drives_the_optimizer_lr(model):
    opt, _ = build_optimizer(param_groups(model, 0.0), lr=2e-3, on_gpu=False, offload=False)
    sched = scheduler_factory(warmup=4, total_steps=20)(opt)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([2e-3 * (s + 1) / 4 for s in range(4)])
    assert seen[4] == pytest.approx(2e-3)
    assert seen[7] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 16)))
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)
