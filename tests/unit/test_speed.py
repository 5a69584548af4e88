"""Speed levers: the FLOPs formula behind MFU, patch dropout, the threads-per-rank choice.

The FLOPs oracle is torch.utils.flop_counter.FlopCounterMode, which counts every matmul, convolution
and attention call the model really makes (forward and backward)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models
from engine.loader.mixture import SourceShares
from engine.train import flops
from engine.train.recipe import Recipe
from engine.train.recipe_settings import RecipeSettings
from engine.train.threads import choose_threads
from models.config import load_text_config, load_vision_config
from models.vit import drop_patches, kept_patches


def _tiny(patch_dropout=0.0):
    torch.manual_seed(0)
    m = models.build_clip("ViT-tiny-test", "BERT-tiny-test")
    m.visual.patch_dropout = patch_dropout
    return m


def _batch(model, b=3, length=16):
    g = torch.Generator().manual_seed(1)
    r = model.image_resolution
    pixels = torch.randn(b, 3, r, r, generator=g)
    ids = torch.randint(5, model.text_config.vocab_size, (b, length), generator=g)
    ids[:, 0] = 101
    return pixels, ids


def _counted(model, pixels, ids):
    """(forward FLOPs, forward + backward FLOPs) as FlopCounterMode counts them, per sample.
    FlopCounterMode has no formula for the CPU flash-attention kernel (it would count attention as
    0); the math backend runs attention as bmm calls, which it counts."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        out = model(pixels, ids, attention_mask=torch.ones_like(ids))  # every position, as the formula
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as bwd:
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    b = pixels.shape[0]
    return fwd.get_total_flops() / b, (fwd.get_total_flops() + bwd.get_total_flops()) / b


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_flops_formula_matches_flop_counter(patch_dropout):
    model = _tiny(patch_dropout)
    pixels, ids = _batch(model, length=16)
    fwd, train = _counted(model, pixels, ids)
    f = flops.clip_sample_flops(load_vision_config("ViT-tiny-test"), load_text_config("BERT-tiny-test"),
                                context_length=16, patch_dropout=patch_dropout)
    assert f.forward == pytest.approx(fwd, rel=0.05)
    assert f.train == pytest.approx(train, rel=0.05)
    # the image tower alone, so an error in one tower cannot hide behind the other
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as img:
        model.visual(pixels)
    assert f.image == pytest.approx(img.get_total_flops() / pixels.shape[0], rel=0.05)


def test_flops_of_the_production_model_are_in_the_published_range():
    # ViT-B/16 at 224 px: timm's model card lists 17.6 GMACs, i.e. ~35.2 GFLOPs forward.
    f = flops.clip_sample_flops(load_vision_config("ViT-B-16"), load_text_config("RoBERTa-wwm-ext-base-chinese"),
                                context_length=52)
    assert 34.5e9 < f.image < 36.0e9
    assert f.train == pytest.approx(3 * f.forward - f.patch_embed)


def test_mfu_needs_a_known_device():
    assert flops.device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert flops.device_peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert flops.device_peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 on V100
    assert flops.device_peak_tflops(None, "bf16") is None
    tflops, mfu = flops.throughput(1e12, 2.0, 4.0)
    assert (tflops, mfu) == (2.0, 0.5)
    assert flops.throughput(1e12, 2.0, None)[1] is None


# ---------------------------------------------------------------- patch dropout

def test_drop_patches_keeps_class_token_and_order():
    torch.manual_seed(0)
    b, n, w = 4, 17, 8
    x = torch.arange(b * n, dtype=torch.float32).view(b, n, 1).expand(b, n, w).clone()
    y = drop_patches(x, 0.5)
    assert y.shape == (b, 1 + kept_patches(16, 0.5), w) == (b, 9, w)
    assert torch.equal(y[:, 0], x[:, 0])  # class token kept, first
    pos = y[:, 1:, 0] - torch.arange(b).view(b, 1) * n  # token positions of the kept patches
    assert (pos >= 1).all() and (pos[:, 1:] > pos[:, :-1]).all()  # real patches, original order
    assert not torch.equal(pos[0], pos[1]) or not torch.equal(pos[1], pos[2])  # random per image


def test_patch_dropout_only_in_training():
    model = _tiny(0.0)
    pixels, ids = _batch(model)
    model.eval()
    ref = model.encode_image(pixels)
    model.visual.patch_dropout = 0.75
    assert torch.equal(model.encode_image(pixels), ref)  # eval: every patch, same features
    model.train()
    seen = {}
    hook = model.visual.transformer.register_forward_hook(lambda m, i, o: seen.update(n=i[0].shape[1]))
    out = model.encode_image(pixels)
    hook.remove()
    assert seen["n"] == 1 + kept_patches(16, 0.75) == 5
    assert not torch.allclose(out, ref)
    out.sum().backward()  # every parameter still gets a gradient
    assert all(p.grad is not None for p in model.visual.parameters())


# ---------------------------------------------------------------- threads per rank

def test_threads_split_the_cores_between_local_ranks():
    env = {"LOCAL_WORLD_SIZE": "2"}
    assert choose_threads(None, env, cores=8)[0] == 4
    assert choose_threads(None, env, cores=2)[0] == 1
    assert choose_threads(None, {"LOCAL_WORLD_SIZE": "4"}, cores=2)[0] == 1  # never 0
    assert choose_threads(None, {}, cores=6)[0] == 6
    n, why = choose_threads(3, env, cores=8)
    assert n == 3 and "--threads" in why
    n, why = choose_threads(None, {"OMP_NUM_THREADS": "5", "LOCAL_WORLD_SIZE": "2"}, cores=8)
    assert n == 5 and "OMP_NUM_THREADS" in why


# ---------------------------------------------------------------- the training log line

def test_log_step_reports_tflops_and_mfu(caplog):
    """Trainer._log_step on a stand-in engine: TensorBoard gets train/tflops = samples/s per device x
    FLOPs per sample, and train/mfu against the peak; the log line shows both."""
    import logging
    import types

    from engine.train.speed import SpeedSettings, Throughput
    from engine.train.trainer import Trainer, _LogWindow

    class TB:
        def __init__(self):
            self.values = {}

        def add(self, step, values):
            self.values.update(values)

    cfg = types.SimpleNamespace(context_length=16, speed=SpeedSettings(patch_dropout=0.5), world_size=2,
                                ds=types.SimpleNamespace(precision="bf16", global_batch=64))
    rate = Throughput(_tiny(), cfg)
    rate.peak = 100.0  # as on a device in the peak table
    fake = types.SimpleNamespace(engine=types.SimpleNamespace(get_global_grad_norm=lambda: 1.0, get_lr=lambda: [1e-3]),
                                 cfg=cfg, rate=rate, tb=TB(), _loss_scale=lambda: None, _window=_LogWindow(),
                                 recipe=Recipe(types.SimpleNamespace(recipe=RecipeSettings())),
                                 shares=SourceShares(None, None))  # one data set: no share scalars
    with caplog.at_level(logging.INFO, logger="clip"):
        Trainer._log_step(fake, 10, 100, 0, 1.5, 1e-3, 14.3, None, n_steps=4, elapsed=2.0)
    per_sample = flops.clip_sample_flops(load_vision_config("ViT-tiny-test"), load_text_config("BERT-tiny-test"),
                                         16, patch_dropout=0.5).train
    expected = 64 * 4 / 2.0 / 2 * per_sample / 1e12  # 128 samples/s over 2 devices
    assert fake.tb.values["train/samples_per_s"] == pytest.approx(128.0)
    assert fake.tb.values["train/tflops"] == pytest.approx(expected)
    assert fake.tb.values["train/mfu"] == pytest.approx(expected / 100.0)
    assert "TFLOP/s/device" in caplog.text and "MFU" in caplog.text


def test_speed_flags_reach_the_config_and_bad_values_are_refused():
    import argparse

    from data.files import InputError
    from engine.train.flags import build_parser
    from engine.train.speed import speed_settings

    args = build_parser().parse_args(["--train-data", "q", "--train-img", "i", "--patch-dropout", "0.5",
                                      "--compile", "--threads", "3"])
    s = speed_settings(args)
    assert (s.patch_dropout, s.compile, s.threads) == (0.5, True, 3)
    for bad in ({"patch_dropout": 1.0}, {"patch_dropout": -0.1}, {"threads": 0}):
        ns = argparse.Namespace(**{"patch_dropout": 0.0, "compile": False, "threads": None, **bad})
        with pytest.raises(InputError, match="--patch-dropout|--threads"):
            speed_settings(ns)
