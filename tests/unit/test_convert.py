"""Weight conversion tests. Every format is written here by its own tooling (torch.jit for OpenAI's
TorchScript, transformers' save_pretrained for RoBERTa and ChineseCLIPModel, a Chinese-CLIP-layout dict)
from tiny random weights; features are compared with the source model's own forward."""
import importlib.util
import json
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertForPreTraining, BertModel, ChineseCLIPConfig, ChineseCLIPModel

import models
from tests.unit.tiny_inputs import images, perturb_, token_batch
from models import weights as convert
from models.weights import WeightConversionError

REPO = Path(__file__).resolve().parents[2]
TINY_V, TINY_T = "ViT-tiny-test", "BERT-tiny-test"


# ------------------------------------------------------------------------------------------------
# An independent, minimal re-implementation of OpenAI's CLIP module layout (sequence-first
# nn.MultiheadAttention blocks, QuickGELU, class token, ln_post on it, @ proj; plus the text side).
# ------------------------------------------------------------------------------------------------

class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, d, heads, causal_len=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", RefQuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)
        mask = None
        if causal_len:
            mask = torch.full((causal_len, causal_len), float("-inf")).triu(1)
        self.attn_mask = mask

    def forward(self, x):  # x: [L, N, D]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, d, layers, heads, causal_len=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(d, heads, causal_len) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefViT(nn.Module):
    def __init__(self, res, patch, width, layers, heads, out):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((res // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out) * width ** -0.5)

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)   # NLD -> LND
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class RefOpenAICLIP(nn.Module):
    def __init__(self, embed=24, res=32, patch=8, width=48, layers=2, heads=4,
                 ctx=12, vocab=50, twidth=32, theads=4, tlayers=2):
        super().__init__()
        self.visual = RefViT(res, patch, width, layers, heads, embed)
        self.transformer = RefTransformer(twidth, tlayers, theads, causal_len=ctx)
        self.token_embedding = nn.Embedding(vocab, twidth)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, twidth) * 0.01)
        self.ln_final = nn.LayerNorm(twidth)
        self.text_projection = nn.Parameter(torch.randn(twidth, embed) * twidth ** -0.5)
        self.logit_scale = nn.Parameter(torch.ones([]) * 2.659)  # 0-dim, as OpenAI's
        # OpenAI's archive also stores these scalars; the converter must drop them.
        self.register_buffer("input_resolution", torch.tensor(res))
        self.register_buffer("context_length", torch.tensor(ctx))

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        i = F.normalize(self.visual(image), dim=-1)
        t = F.normalize(self.encode_text(text), dim=-1)
        return self.logit_scale.exp() * i @ t.t()


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb_(RefOpenAICLIP()).eval()
    d = tmp_path_factory.mktemp("openai")
    with torch.no_grad(), warnings.catch_warnings():  # tracing nn.MultiheadAttention is noisy
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ref, (images(2), torch.randint(1, 50, (2, 12))), check_trace=False)
    traced.save(str(d / "ViT-tiny.pt"))
    torch.save(ref.state_dict(), d / "plain.pt")
    return ref, d / "ViT-tiny.pt", d / "plain.pt"


def test_openai_torchscript_converts_with_identical_features(openai_files, tmp_path):
    ref, jit_path, _ = openai_files
    assert convert.is_torchscript(jit_path)
    state, cfg, report = convert.convert_openai(jit_path)
    model = models.build_clip(TINY_V, TINY_T).eval()
    assert set(state) == {k for k in model.state_dict() if k.startswith("visual.")} | {"logit_scale"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and not [k for k in missing if k.startswith("visual.") or k == "logit_scale"]
    assert convert.match_vision_config(cfg) == TINY_V and cfg.vision_heads == 4
    assert state["logit_scale"].shape == (1,) and state["logit_scale"].item() == pytest.approx(ref.logit_scale.item())
    dropped = sum(report.dropped.values(), [])
    assert "token_embedding.weight" in dropped and "input_resolution" in dropped
    assert len(dropped) == len(ref.state_dict()) - len(state)
    assert "token_embedding.weight" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images(), normalize=False), ref.visual(images()),
                                   atol=1e-5, rtol=1e-5)

    # Through the file the trainer loads.
    convert.save_state_dict(state, tmp_path / "vit.pt")
    fresh = models.build_clip(TINY_V, TINY_T).eval()
    assert "image tower" in convert.load_image_tower(fresh, tmp_path / "vit.pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_image(images()), model.encode_image(images()))


def test_openai_plain_state_dict_and_loud_errors(openai_files, tmp_path):
    ref, jit_path, plain = openai_files
    state, _, _ = convert.convert_openai(plain)
    state_jit, _, _ = convert.convert_openai(jit_path)
    assert all(torch.equal(state[k], state_jit[k]) for k in state_jit) and set(state) == set(state_jit)

    broken = ref.state_dict()
    del broken["visual.ln_post.weight"]
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(WeightConversionError, match=r"missing 1: visual\.ln_post\.weight"):
        convert.convert_openai(tmp_path / "missing.pt")

    model = models.build_clip("ViT-demo-64", TINY_T)
    with pytest.raises(WeightConversionError, match=r"visual\.conv1\.weight: file \(48, 3, 8, 8\) vs model \(128, 3, 16, 16\)"):
        convert.load_image_tower(model, plain)  # plain OpenAI keys include the text side...
    convert.save_state_dict(state, tmp_path / "vit.pt")
    with pytest.raises(WeightConversionError, match=r"wrong shape .*visual\.proj"):
        convert.load_image_tower(model, tmp_path / "vit.pt")
    # TorchScript never reaches torch.load: the loaders refuse it and point at the converter.
    with pytest.raises(WeightConversionError, match="openai-vit"):
        convert.load_image_tower(models.build_clip(TINY_V, TINY_T), jit_path)


# ------------------------------------------------------------------------------------------------
# Chinese RoBERTa folders
# ------------------------------------------------------------------------------------------------

def tiny_bert_config(**kw):
    fields = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(kw)
    return BertConfig(**fields)


@pytest.fixture(scope="module")
def roberta_folders(tmp_path_factory):
    """The same tiny pre-trained BERT in the two public layouts: transformers' (config.json +
    model.safetensors) and the original release's (bert_config.json + pytorch_model.bin, TF-style
    LayerNorm gamma/beta names)."""
    torch.manual_seed(0)
    pretrain = perturb_(BertForPreTraining(tiny_bert_config())).eval()
    a = tmp_path_factory.mktemp("roberta_hf")
    pretrain.save_pretrained(a)
    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"字{i}" for i in range(123)]) + "\n"
    (a / "vocab.txt").write_text(vocab, encoding="utf-8")
    b = tmp_path_factory.mktemp("roberta_release")
    cfg = tiny_bert_config().to_dict()
    cfg.update(directionality="bidi", pooler_fc_size=32)  # extras the real bert_config.json carries
    (b / "bert_config.json").write_text(json.dumps(cfg))
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in pretrain.state_dict().items()}
    torch.save(legacy, b / "pytorch_model.bin")
    (b / "vocab.txt").write_text(vocab, encoding="utf-8")
    return a, b


def tiny_text_json(tmp_path):
    path = tmp_path / "text.json"
    data = json.loads((REPO / "models/configs/BERT-tiny-test.json").read_text())
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("layout", [0, 1])
def test_roberta_folder_loads_into_text_tower(roberta_folders, layout):
    folder = roberta_folders[layout]
    model = perturb_(models.build_clip(TINY_V, TINY_T), seed=5).eval()
    report = convert.load_text_tower(model, folder)
    assert "cls." in report and "pooler" in report
    oracle = BertModel.from_pretrained(roberta_folders[0], add_pooling_layer=False).eval()  # transformers' own loader
    ids = token_batch()
    with torch.no_grad():
        cls = oracle(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0]
        torch.testing.assert_close(model.encode_text(ids), F.normalize(cls @ model.text_projection, dim=-1),
                                   atol=1e-5, rtol=1e-5)


def test_roberta_conversion_uses_every_tensor_and_fails_loudly(roberta_folders, tmp_path):
    state, config, report = convert.convert_roberta(roberta_folders[1])
    source = torch.load(roberta_folders[1] / "pytorch_model.bin", weights_only=True)
    dropped = sum(report.dropped.values(), [])
    assert len(state) + len(dropped) == len(source)
    assert all(k.startswith(("cls.", "bert.pooler.")) for k in dropped)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bert_config.json").write_text((roberta_folders[1] / "bert_config.json").read_text())
    extra = dict(source)
    extra["bert.encoder.layer.0.adapter.weight"] = torch.zeros(3)
    del extra["bert.encoder.layer.1.output.dense.bias"]
    torch.save(extra, bad / "pytorch_model.bin")
    with pytest.raises(WeightConversionError) as e:
        convert.convert_roberta(bad)
    assert "bert.encoder.layer.0.adapter.weight" in str(e.value)
    assert "bert.encoder.layer.1.output.dense.bias" in str(e.value)

    # Heads do not show in shapes: the config comparison catches them.
    model = models.build_clip(TINY_V, TINY_T)
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "config.json").write_text(tiny_bert_config(num_attention_heads=8).to_json_string())
    (heads / "model.safetensors").write_bytes((roberta_folders[0] / "model.safetensors").read_bytes())
    with pytest.raises(WeightConversionError, match="num_attention_heads"):
        convert.load_text_tower(model, heads)


# ------------------------------------------------------------------------------------------------
# transformers ChineseCLIPModel
# ------------------------------------------------------------------------------------------------

def tiny_hf_model():
    torch.manual_seed(0)
    cfg = ChineseCLIPConfig(
        text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64),
        vision_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu"),
        projection_dim=24)
    return perturb_(ChineseCLIPModel(cfg)).eval()


def hf_features(hf, pixels, ids):
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=pixels).pooler_output
        txt = hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_hf_chinese_clip_to_ours_and_back(tmp_path):
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    state, vision, text, report = convert.convert_hf(tmp_path / "hf")
    assert (convert.match_vision_config(vision), convert.match_text_config(text)) == (TINY_V, TINY_T)
    model = models.build_clip(vision, text).eval()
    convert.load_pretrained_clip(model, tmp_path / "hf")
    pixels, ids = images(), token_batch()
    want_img, want_txt = hf_features(hf, pixels, ids)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), want_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), want_txt, atol=1e-5, rtol=0)
    assert model.logit_scale.item() == pytest.approx(hf.logit_scale.item())

    # And back: from_pretrained of our export gives the same features and the very same tensors.
    perturb_(model, seed=7)
    convert.export_hf(model.state_dict(), vision, text, tmp_path / "back")
    hf2 = ChineseCLIPModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        got_img, got_txt = hf_features(hf2, pixels, ids)
        torch.testing.assert_close(got_img, model.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(got_txt, model.encode_text(ids), atol=1e-5, rtol=0)
    again, _, _, _ = convert.convert_hf(tmp_path / "back")
    ours = model.state_dict()
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
    assert hf2.config.vision_config.hidden_act == "quick_gelu"
    with pytest.raises(WeightConversionError, match="not an empty directory"):
        convert.export_hf(model.state_dict(), vision, text, tmp_path / "back")


def test_hf_unknown_tensor_is_refused(tmp_path):
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "hf" / "model.safetensors")
    sd["vision_model.extra_head.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(WeightConversionError, match=r"vision_model\.extra_head\.weight"):
        convert.load_pretrained_clip(models.build_clip(TINY_V, TINY_T), tmp_path / "hf")


# ------------------------------------------------------------------------------------------------
# Chinese-CLIP checkpoints
# ------------------------------------------------------------------------------------------------

def chinese_clip_checkpoint():
    """A checkpoint in Chinese-CLIP's layout, assembled from independent modules: OpenAI-layout visual,
    a transformers BertModel *with* pooler, text_projection [hidden, embed], 0-dim logit_scale."""
    torch.manual_seed(0)
    visual = perturb_(RefViT(32, 8, 48, 2, 4, 24)).eval()
    bert = perturb_(BertModel(tiny_bert_config())).eval()
    proj = torch.randn(32, 24) * 0.2
    sd = {f"module.visual.{k}": v for k, v in visual.state_dict().items()}
    sd.update({f"module.bert.{k}": v for k, v in bert.state_dict().items()})
    sd["module.text_projection"] = proj
    sd["module.logit_scale"] = torch.tensor(4.2)
    return {"epoch": 3, "step": 1200, "name": "muge_finetune", "state_dict": sd}, visual, bert, proj


def test_chinese_clip_checkpoint_in_and_out(tmp_path):
    ckpt, visual, bert, proj = chinese_clip_checkpoint()
    torch.save(ckpt, tmp_path / "cn.pt")
    model = models.build_clip(TINY_V, TINY_T).eval()
    report = convert.load_pretrained_clip(model, tmp_path / "cn.pt")
    assert "bert.pooler" in report and "epoch 3" in report
    pixels, ids = images(), token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), F.normalize(visual(pixels), dim=-1), atol=1e-5, rtol=0)
        cls = bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0]
        torch.testing.assert_close(model.encode_text(ids), F.normalize(cls @ proj, dim=-1), atol=1e-5, rtol=0)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == pytest.approx(4.2)

    out = convert.to_chinese_clip(model.state_dict(), name="ours", epoch=1, step=5)
    assert (out["epoch"], out["step"], out["name"]) == (1, 5, "ours")
    src = {k: v for k, v in ckpt["state_dict"].items() if ".pooler." not in k}
    assert set(out["state_dict"]) == set(src)
    assert out["state_dict"]["module.logit_scale"].dim() == 0
    assert all(torch.equal(out["state_dict"][k], src[k]) for k in src)


def test_chinese_clip_mismatch_names_the_architecture_in_one_line(tmp_path):
    ckpt, *_ = chinese_clip_checkpoint()
    torch.save(ckpt, tmp_path / "cn.pt")
    with pytest.raises(WeightConversionError) as e:
        convert.load_pretrained_clip(models.build_clip("ViT-demo-64", TINY_T), tmp_path / "cn.pt")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    assert f"the weights are vision {TINY_V} (width 48, 2 layers, patch 8, 32 px" in msg
    assert "the model is vision ViT-demo-64 (width 128, 4 layers" in msg and f"text {TINY_T}" in msg


# ------------------------------------------------------------------------------------------------
# The CLI
# ------------------------------------------------------------------------------------------------

def load_cli():
    spec = importlib.util.spec_from_file_location("convert_weights_cli", REPO / "launch" / "convert_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_help_runs_from_repo_root_and_documents_formats():
    out = subprocess.run([sys.executable, "launch/convert_weights.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=360)
    assert out.returncode == 0, out.stderr
    for word in ("openai-vit", "roberta", "from-chinese-clip", "to-chinese-clip", "from-hf", "to-hf",
                 "TorchScript", "EXECUTES", "weights_only=True", "bert_config.json", "model.safetensors",
                 "module.", "save_pretrained"):
        assert word in out.stdout, word


def test_cli_chain_through_every_format(openai_files, roberta_folders, tmp_path, capsys):
    cli = load_cli()
    _, jit_path, _ = openai_files
    assert cli.main(["openai-vit", "--input", str(jit_path), "--output", str(tmp_path / "vit.pt"),
                     "--vision", TINY_V]) == 0
    assert "token_embedding" in capsys.readouterr().out
    assert cli.main(["roberta", "--input", str(roberta_folders[0]), "--output", str(tmp_path / "bert.pt"),
                     "--text-model", TINY_T]) == 0
    model = models.build_clip(TINY_V, TINY_T).eval()
    convert.load_image_tower(model, tmp_path / "vit.pt")
    convert.load_text_tower(model, tmp_path / "bert.pt")
    convert.save_state_dict(model.state_dict(), tmp_path / "ours.pt")

    pairs = ["--vision", TINY_V, "--text", TINY_T]
    assert cli.main(["to-chinese-clip", "--input", str(tmp_path / "ours.pt"), "--output", str(tmp_path / "cn.pt")] + pairs) == 0
    assert cli.main(["from-chinese-clip", "--input", str(tmp_path / "cn.pt"), "--output", str(tmp_path / "ours2.pt")] + pairs) == 0
    vocab = roberta_folders[0] / "vocab.txt"
    assert cli.main(["to-hf", "--input", str(tmp_path / "ours2.pt"), "--output", str(tmp_path / "hf"),
                     "--vocab", str(vocab)] + pairs) == 0
    assert cli.main(["from-hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours3.pt")]) == 0
    final = torch.load(tmp_path / "ours3.pt", weights_only=True)
    start = model.state_dict()
    assert set(final) == set(start) and all(torch.equal(final[k], start[k]) for k in start)
    from transformers import BertTokenizer

    assert len(BertTokenizer.from_pretrained(tmp_path / "hf")) == 128

    capsys.readouterr()
    assert cli.main(["from-chinese-clip", "--input", str(tmp_path / "cn.pt"), "--output", str(tmp_path / "x.pt"),
                     "--vision", "ViT-demo-64", "--text", TINY_T]) == 2
    err = capsys.readouterr().err
    # One line naming both architectures, as every tool that reads a model says it.
    assert "error:" in err and "the weights are vision" in err and "the model is vision ViT-demo-64" in err
    assert not (tmp_path / "x.pt").exists()
