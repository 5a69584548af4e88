"""The recipe's flags (engine.train.recipe_settings): each resolves as documented, and each that cannot
apply is refused with one line naming what to change, before any work; a teacher whose tokenizer
differs from the training one is refused when it is loaded (engine.train.distill); a resume refuses a
changed recipe; the logit bias of a sigmoid-trained model survives our model file and loaders."""
import types

import pytest
import torch

from data.files import InputError
from data.tokenizer import load_tokenizer
from engine.run.resume import RunShape, check
from engine.train.distill import load_teacher
from models import build_clip
from models.weights.model_file import make_record, save_model_file
from tests.unit.test_config_engine import cfg_of, ds, files  # noqa: F401  (files is a fixture)

VOCAB = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n" + "".join(f"字{i}\n" for i in range(20))


def test_defaults_and_the_alias(files):  # noqa: F811
    r = cfg_of(files, ds(files)).recipe
    assert (r.loss, r.lock_image, r.lock_text, r.image_lr_decay, r.distill_from) == ("clip", False, False, 1.0, None)
    r = cfg_of(files, ds(files), "--freeze-image-tower").recipe
    assert r.lock_image and r.lock_image_proj and r.lock_image_unlocked_layers == 0
    assert cfg_of(files, ds(files), "--loss", "siglip").recipe.sigmoid_exchange == "ring"
    r = cfg_of(files, ds(files), "--loss", "siglip", "--sigmoid-chunk", "64", "--lock-text",
               "--lock-text-unlocked-layers", "2", "--image-lr-decay", "0.85", "--text-lr-decay", "0.75").recipe
    assert (r.loss, r.sigmoid_chunk, r.lock_text_unlocked_layers, r.image_lr_decay, r.text_lr_decay) == \
        ("siglip", 64, 2, 0.85, 0.75)


@pytest.mark.parametrize("flags,message", [
    (["--sigmoid-chunk", "8"], "--sigmoid-chunk must be >= 0 and applies to --loss siglip only"),
    (["--sigmoid-exchange", "gather"], "--sigmoid-exchange applies to --loss siglip only"),
    (["--distill-weight", "0.5"], "--distill-weight applies to distillation: add --distill-from MODEL"),
    (["--distill-device", "cpu"], "--distill-device applies to distillation"),
    (["--distill-from", "absent.pt"], "--distill-from absent.pt: no such file or directory"),
    (["--lock-image-unlocked-layers", "1"], "--lock-image-unlocked-layers applies to a locked tower: add --lock-image"),
    (["--lock-text-proj"], "--lock-text-proj applies to a locked tower: add --lock-text"),
    (["--lock-image", "--lock-image-unlocked-layers", "3"], "the image tower has 2 blocks"),
    (["--lock-text", "--lock-text-unlocked-layers", "-1"], "the text tower has 2 blocks"),
    (["--freeze-image-tower", "--lock-text", "--lock-text-proj"], "nothing but the logit scale would train"),
    (["--image-lr-decay", "0"], "--image-lr-decay must be in (0, 1]"),
    (["--text-lr-decay", "1.5"], "--text-lr-decay must be in (0, 1]"),
])
def test_what_cannot_apply_is_refused_in_one_line(files, flags, message):  # noqa: F811
    with pytest.raises(InputError) as e:
        cfg_of(files, ds(files), *flags)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_distillation_refusals_that_need_a_teacher_file(files):  # noqa: F811
    teacher = files / "teacher.pt"
    teacher.write_bytes(b"")
    with pytest.raises(InputError, match="--distill-from works with --loss clip"):
        cfg_of(files, ds(files), "--distill-from", str(teacher), "--loss", "siglip")
    with pytest.raises(InputError, match="--distill-weight must be > 0"):
        cfg_of(files, ds(files), "--distill-from", str(teacher), "--distill-weight", "0")
    with pytest.raises(InputError, match="--distill-device cuda:7: no such CUDA device here"):
        cfg_of(files, ds(files), "--distill-from", str(teacher), "--distill-device", "cuda:7")
    r = cfg_of(files, ds(files), "--distill-from", str(teacher), "--distill-device", "cpu").recipe
    assert (r.distill_weight, r.distill_device) == (1.0, "cpu")


def _model_file(tmp_path, vocab_text, name, sigmoid=False):
    vocab = tmp_path / f"{name}_vocab.txt"
    vocab.write_text(vocab_text, encoding="utf-8")
    n = len(vocab_text.splitlines())
    model = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=n)
    if sigmoid:
        model.start_sigmoid_logits()
        with torch.no_grad():
            model.logit_bias.fill_(-7.5)
    record = make_record(model.vision_config, model.text_config, vocab, 16,
                         {"resolution": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "squash"})
    save_model_file(model.state_dict(), record, tmp_path / f"{name}.pt")
    return tmp_path / f"{name}.pt", vocab


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    student_vocab = tmp_path / "vocab.txt"
    student_vocab.write_text(VOCAB, encoding="utf-8")
    tok = load_tokenizer(student_vocab)
    store = types.SimpleNamespace(mean=[0.5] * 3, std=[0.25] * 3, resolution=32)
    other = VOCAB.replace("字3\n", "词3\n")  # same size, one token differs
    path, _ = _model_file(tmp_path, other, "other")
    with pytest.raises(InputError) as e:
        load_teacher(str(path), None, None, tok, store, 16, torch.device("cpu"), torch.float32)
    assert "the teacher's tokenizer" in str(e.value) and "no mapping" in str(e.value)
    path, _ = _model_file(tmp_path, VOCAB, "same")
    teacher = load_teacher(str(path), None, None, tok, store, 16, torch.device("cpu"), torch.float32)
    out = teacher(torch.randn(2, 3, 32, 32), torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3]]))
    assert out["teacher_image_features"].shape == (2, 24) and out["teacher_logit_scale"].shape == (1,)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(InputError, match="exceeds the teacher's max_position_embeddings 64"):
        load_teacher(str(path), None, None, tok, store, 100, torch.device("cpu"), torch.float32)


def test_the_logit_bias_travels_with_the_weights(tmp_path):
    from engine.inference.model import load_model
    from engine.inference.source import load_weights_into
    from engine.train.recipe import prepare_logits
    from models.weights import load_pretrained_clip, to_chinese_clip

    path, _ = _model_file(tmp_path, VOCAB, "sig", sigmoid=True)
    assert load_model(weights=str(path)).model.logit_bias.item() == -7.5  # the tools' loader
    n = len(VOCAB.splitlines())
    fresh = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=n)
    load_pretrained_clip(fresh, path)
    assert fresh.logit_bias.item() == -7.5
    fresh = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=n)
    load_weights_into(fresh, str(path))  # train's --init-from
    prepare_logits(fresh, "siglip")  # the weights' bias and scale are kept, not reset
    assert fresh.logit_bias.item() == -7.5 and abs(fresh.scale().item() - 10.0) < 1e-5
    prepare_logits(fresh, "clip")  # the softmax loss drops it
    assert fresh.logit_bias is None and "logit_bias" not in fresh.state_dict()
    softmax = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=n)
    prepare_logits(softmax, "siglip")  # weights without a bias: SigLIP's start
    assert softmax.logit_bias.item() == -10.0 and abs(softmax.scale().item() - 10.0) < 1e-5
    from models.weights import export_hf  # a ChineseCLIPModel has no bias: the export leaves it out

    with_bias = load_model(weights=str(path)).model
    export_hf(with_bias.state_dict(), with_bias.vision_config, with_bias.text_config, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    # cn_clip's model has no bias and loads strictly: the Chinese-CLIP export leaves it out too
    ckpt = to_chinese_clip(with_bias.state_dict())["state_dict"]
    assert "module.logit_bias" not in ckpt and len(ckpt) == len(with_bias.state_dict()) - 1


def test_a_resume_refuses_a_changed_recipe():
    from engine.train.recipe_settings import RecipeSettings

    saved_sig = RecipeSettings(lock_image=True).state_signature()
    run = lambda sig: RunShape(1, 8, 1, 100, 0, "fp32", "global", recipe=sig)  # noqa: E731
    saved = {**run(saved_sig).record(), "zero_stage": 0, "precision": "fp32"}
    check(saved, run(saved_sig), "ckpt")  # the same recipe resumes
    teacher = RecipeSettings(lock_image=True, distill_from="t.pt")  # the teacher may change
    check(saved, run(teacher.state_signature()), "ckpt")
    with pytest.raises(InputError, match="saved with lock_image=True, this run asks lock_image=False"):
        check(saved, run(RecipeSettings().state_signature()), "ckpt")
    old = {k: v for k, v in saved.items() if k != "recipe"}  # a checkpoint from before recipes
    check(old, run(RecipeSettings(loss="siglip").state_signature()), "ckpt")
