"""Unit tests of models/: configs, the two towers, the dual encoder and the contrastive loss.

Oracles are independent implementations: nn.MultiheadAttention for our attention, transformers' eager
BertModel for the text tower, an explicit log-sum-exp loop for the loss."""
import ast
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertModel

import models
from tests.unit.tiny_inputs import perturb_, token_batch
from models import fused
from models.config import load_text_config, load_vision_config
from models.towers import lock_tower
from models.vit import Attention, ResidualAttentionBlock, VisionConfig

REPO = Path(__file__).resolve().parents[2]


def tiny(**kwargs):
    torch.manual_seed(0)
    return models.build_clip("ViT-tiny-test", "BERT-tiny-test", **kwargs)


# ---------------------------------------------------------------- configs

def test_named_configs_exist_and_build():
    names = models.list_model_configs()
    assert {"ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-tiny-test", "ViT-demo-64"} <= set(names["vision"])
    assert {"RoBERTa-wwm-ext-base-chinese", "RoBERTa-wwm-ext-large-chinese", "RBT3-chinese", "BERT-tiny-test",
            "BERT-demo"} <= set(names["text"])
    pairs = [(v, "BERT-tiny-test") for v in names["vision"]] + [("ViT-tiny-test", t) for t in names["text"]]
    with torch.device("meta"):  # shapes only, no memory
        for v, t in pairs:
            m = models.build_clip(v, t)
            assert tuple(m.text_projection.shape) == (m.bert.config.hidden_size, m.embed_dim)
            assert m.visual.positional_embedding.shape[0] == (m.image_resolution // m.vision_config.vision_patch_size) ** 2 + 1


def test_real_configs_have_published_shapes():
    # (embed, resolution, layers, width, patch, heads) as published for OpenAI / Chinese-CLIP (H/14: 80-wide heads)
    published = {"ViT-B-16": (512, 224, 12, 768, 16, 12), "ViT-L-14": (768, 224, 24, 1024, 14, 16),
                 "ViT-L-14-336": (768, 336, 24, 1024, 14, 16), "ViT-H-14": (1024, 224, 32, 1280, 14, 16)}
    for name, want in published.items():
        c = load_vision_config(name)
        assert (c.embed_dim, c.image_resolution, c.vision_layers, c.vision_width, c.vision_patch_size,
                c.vision_heads) == want
        assert c.act == "quick_gelu"
    text = {"RoBERTa-wwm-ext-base-chinese": (768, 12, 12, 3072), "RoBERTa-wwm-ext-large-chinese": (1024, 24, 16, 4096),
            "RBT3-chinese": (768, 3, 12, 3072)}
    for name, want in text.items():
        c = load_text_config(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == want
        assert (c.vocab_size, c.max_position_embeddings, c.type_vocab_size) == (21128, 512, 2)
    demo = load_vision_config("ViT-demo-64")
    assert (demo.image_resolution, demo.vision_patch_size, demo.vision_width, demo.vision_layers,
            demo.vision_heads, demo.embed_dim) == (64, 16, 128, 4, 4, 128)
    bd = load_text_config("BERT-demo")
    assert (bd.num_hidden_layers, bd.hidden_size, bd.num_attention_heads, bd.intermediate_size) == (2, 128, 4, 512)


def test_vocab_override_and_json_path(tmp_path):
    m = models.build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=57)
    assert m.bert.embeddings.word_embeddings.weight.shape[0] == 57
    vis = json.loads((REPO / "models/configs/ViT-tiny-test.json").read_text())
    vis["embed_dim"] = 16
    (tmp_path / "v.json").write_text(json.dumps(vis))
    m = models.build_clip(tmp_path / "v.json", "BERT-tiny-test")
    assert m.embed_dim == 16 and m.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 16)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="ViT-B-16"):  # lists the known names
        models.build_clip("ViT-nonexistent", "BERT-tiny-test")
    bad = json.loads((REPO / "models/configs/ViT-tiny-test.json").read_text())
    bad["vision_widht"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json.*vision_widht"):
        load_vision_config(tmp_path / "bad.json")
    text = json.loads((REPO / "models/configs/BERT-tiny-test.json").read_text())
    text["hiden_size"] = 3
    (tmp_path / "t.json").write_text(json.dumps(text))
    with pytest.raises(ValueError, match=r"t\.json.*hiden_size"):
        load_text_config(tmp_path / "t.json")
    with pytest.raises(ValueError, match="heads"):
        VisionConfig(embed_dim=8, image_resolution=32, vision_layers=1, vision_width=30, vision_patch_size=8,
                     vision_heads=4)
    with pytest.raises(ValueError, match="act"):
        VisionConfig(8, 32, 1, 32, 8, 4, act="relu")


# ---------------------------------------------------------------- image tower

def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    width, heads = 48, 4
    ours = perturb_(Attention(width, heads))
    ref = nn.MultiheadAttention(width, heads)  # batch_first=False, as in OpenAI's code
    ref.load_state_dict(ours.state_dict(), strict=True)  # same parameter names
    x = torch.randn(3, 17, width)
    want = ref(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_block_matches_reference_formula(act):
    torch.manual_seed(0)
    block = perturb_(ResidualAttentionBlock(32, 4, act))
    ref_attn = nn.MultiheadAttention(32, 4, batch_first=True)
    ref_attn.load_state_dict(block.attn.state_dict())
    x = torch.randn(2, 5, 32)

    def act_fn(h):  # QuickGELU is OpenAI's x * sigmoid(1.702 x)
        return h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))

    h = x + ref_attn(*(3 * [F.layer_norm(x, (32,), block.ln_1.weight, block.ln_1.bias)]), need_weights=False)[0]
    z = F.layer_norm(h, (32,), block.ln_2.weight, block.ln_2.bias)
    want = h + F.linear(act_fn(F.linear(z, block.mlp.c_fc.weight, block.mlp.c_fc.bias)),
                        block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


def test_vit_state_dict_uses_openai_names():
    m = tiny()
    keys = set(m.visual.state_dict())
    for k in ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_post.bias", "proj",
              "transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.1.attn.in_proj_bias",
              "transformer.resblocks.1.attn.out_proj.weight", "transformer.resblocks.0.ln_1.weight",
              "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_proj.bias",
              "transformer.resblocks.0.ln_2.bias"]:
        assert k in keys
    assert "conv1.bias" not in keys
    assert set(models.build_clip("ViT-tiny-test", "BERT-tiny-test").state_dict()) == set(m.state_dict())


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        tiny().encode_image(torch.zeros(1, 3, 64, 64))


# ---------------------------------------------------------------- text tower and dual encoder

def test_encode_text_is_cls_state_times_projection():
    m = perturb_(tiny()).eval()
    ids = token_batch()
    # Oracle: a separately built transformers BertModel with eager (non-SDPA) attention.
    cfg = load_text_config("BERT-tiny-test")
    cfg._attn_implementation = "eager"
    ref = BertModel(cfg, add_pooling_layer=False).eval()
    ref.load_state_dict(m.bert.state_dict())
    with torch.no_grad():
        cls = ref(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0]
        want = F.normalize(cls @ m.text_projection, dim=-1)
        got = m.encode_text(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    # The default mask ignores padding: more padding changes nothing.
    with torch.no_grad():
        padded = m.encode_text(torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], dim=1))
        trimmed = torch.stack([m.encode_text(ids[i:i + 1, :n])[0] for i, n in enumerate((9, 5, 7))])
    torch.testing.assert_close(padded, got, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trimmed, got, atol=1e-5, rtol=1e-5)


def test_forward_and_logit_scale():
    m = tiny().eval()
    assert m.logit_scale.shape == (1,)  # never 0-dim (DeepSpeed 0.19.8)
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    out = m(torch.randn(3, 3, 32, 32), token_batch())
    assert out["image_features"].shape == out["text_features"].shape == (3, 24)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(math.log(1000.0))
    assert m(torch.randn(1, 3, 32, 32), token_batch(lengths=(4,)))["logit_scale"].item() == pytest.approx(100.0)
    assert (m.embed_dim, m.image_resolution) == (24, 32)


def test_bf16_forward_close_to_fp32():
    m = perturb_(tiny()).eval()
    x, ids = torch.randn(2, 3, 32, 32), token_batch(lengths=(6, 3))
    with torch.no_grad():
        want = m(x, ids)
        got = m.to(torch.bfloat16)(x.bfloat16(), ids)
    for k in ("image_features", "text_features"):
        assert got[k].dtype == torch.bfloat16
        assert F.cosine_similarity(got[k].float(), want[k]).min() > 0.98


# ---------------------------------------------------------------- loss

def oracle_loss(img_rows, txt_rows, img_cols, txt_cols, scale, offset):
    total = 0.0
    n = img_rows.shape[0]
    for i in range(n):
        li = [scale * float(img_rows[i] @ txt_cols[j]) for j in range(txt_cols.shape[0])]
        lt = [scale * float(txt_rows[i] @ img_cols[j]) for j in range(img_cols.shape[0])]
        lse_i = math.log(sum(math.exp(v) for v in li))
        lse_t = math.log(sum(math.exp(v) for v in lt))
        total += ((lse_i - li[offset + i]) + (lse_t - lt[offset + i])) / 2
    return total / n


def test_contrastive_loss_matches_oracle():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor([4.0])
    got = models.contrastive_loss(img[2:4], txt[2:4], img, txt, scale, row_offset=2)
    assert got.item() == pytest.approx(oracle_loss(img[2:4], txt[2:4], img, txt, 4.0, 2), rel=1e-5)
    with pytest.raises(ValueError):
        models.contrastive_loss(img[4:], txt[4:], img, txt, scale, row_offset=5)


def test_local_and_global_clip_loss_agree_across_simulated_ranks():
    torch.manual_seed(0)
    world, n = 3, 4
    img = F.normalize(torch.randn(world * n, 8), dim=-1)
    txt = F.normalize(torch.randn(world * n, 8), dim=-1)
    scale = torch.tensor([10.0])
    full = oracle_loss(img, txt, img, txt, 10.0, 0)
    local, glob = [], []
    for r in range(world):
        sl = slice(r * n, (r + 1) * n)
        mine_img, mine_txt = img[sl], txt[sl]

        def gather(t, mine_img=mine_img):  # what all_gather returns: every rank's rows in rank order
            return img if t is mine_img else txt

        local.append(models.ClipLoss(gather, rank=r, local_loss=True)(mine_img, mine_txt, scale).item())
        glob.append(models.ClipLoss(gather, rank=r, local_loss=False)(mine_img, mine_txt, scale).item())
    assert sum(local) / world == pytest.approx(full, rel=1e-5)
    assert glob == pytest.approx([full] * world, rel=1e-5)
    assert models.ClipLoss()(img, txt, scale).item() == pytest.approx(full, rel=1e-5)


# ---------------------------------------------------------------- gradients

def _grads(m):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = m(images, token_batch(lengths=(9, 5, 7, 2), seed=4))
    loss = models.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return {n: p.grad for n, p in m.named_parameters()}


def test_every_parameter_gets_a_finite_gradient():
    m = perturb_(tiny()).train()
    grads = _grads(m)
    no_grad = [n for n, g in grads.items() if g is None]
    assert not no_grad, no_grad
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, bad
    assert grads["logit_scale"].abs().item() > 0 and grads["visual.conv1.weight"].abs().sum() > 0


def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients():
    reference = _grads(perturb_(tiny()).train())
    m = perturb_(tiny(grad_checkpointing=True)).train()
    calls = {"vit": 0, "bert": 0}
    m.visual.transformer.resblocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("vit", calls["vit"] + 1))
    m.bert.encoder.layer[0].attention.register_forward_pre_hook(lambda *a: calls.__setitem__("bert", calls["bert"] + 1))
    grads = _grads(m)
    # forward, then the recomputation in backward. Pre-hooks (recomputation may stop early), on a child
    # for BERT (transformers checkpoints inside the layer's forward, below its own hooks).
    assert calls == {"vit": 2, "bert": 2}
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
    m.set_grad_checkpointing(False)
    calls.update(vit=0, bert=0)
    _grads(m)
    assert calls == {"vit": 1, "bert": 1}


def test_freeze_image_tower():
    m = tiny().train()
    lock_tower(m, "image", lock_projection=True)  # what --freeze-image-tower asks (engine.train.recipe)
    grads = _grads(m)
    assert all(grads[n] is None for n in grads if n.startswith("visual."))
    assert all(grads[n] is not None for n in grads if not n.startswith("visual."))


# ---------------------------------------------------------------- apex guard and import hygiene

def test_apex_import_guard_needs_the_compiled_extension(monkeypatch):
    monkeypatch.delenv("CLIP_NO_APEX", raising=False)
    fake_fn = lambda *a: None  # noqa: E731
    apex = types.ModuleType("apex")
    norm = types.ModuleType("apex.normalization")
    fln = types.ModuleType("apex.normalization.fused_layer_norm")
    fln.fused_layer_norm_affine = fake_fn
    for name, mod in {"apex": apex, "apex.normalization": norm, "apex.normalization.fused_layer_norm": fln}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", None)  # a Python-only apex build
    assert fused._import_apex_layer_norm() is None
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda"))
    assert fused._import_apex_layer_norm() is fake_fn
    monkeypatch.setenv("CLIP_NO_APEX", "1")
    assert fused._import_apex_layer_norm() is None


def test_fused_layer_norm_keeps_names_and_values(monkeypatch):
    calls = []

    def fake_affine(x, weight, bias, shape, eps):
        calls.append(tuple(shape))
        return F.layer_norm(x, shape, weight, bias, eps)

    m = perturb_(tiny()).eval()
    ids = token_batch()
    with torch.no_grad():
        want = m.encode_text(ids), m.encode_image(torch.ones(1, 3, 32, 32))
    keys = list(m.state_dict())
    n_plain = sum(type(x) is nn.LayerNorm for x in m.bert.modules())
    assert fused.swap_layer_norms(m.bert) == n_plain > 0
    assert not any(type(x) is nn.LayerNorm for x in m.modules())
    assert list(m.state_dict()) == keys
    monkeypatch.setattr(fused, "_fused_affine", fake_affine)
    monkeypatch.setattr(fused, "_use_fused", lambda x: True)
    with torch.no_grad():
        got = m.encode_text(ids), m.encode_image(torch.ones(1, 3, 32, 32))
    assert len(calls) == n_plain + 2 + 2 * 2  # BERT's, ln_pre/ln_post, ln_1/ln_2 of 2 ViT blocks
    torch.testing.assert_close(got, want)


def test_models_import_no_deepspeed_distributed_or_engine():
    offenders = []
    for path in (REPO / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] in ("deepspeed", "engine") or n.startswith("torch.distributed")]
    assert not offenders, offenders
