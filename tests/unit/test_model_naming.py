"""One way to name a model (engine/inference/naming.py, source.py): zeroshot, export_onnx and train's
--init-from take the model file alone or its run dir; the record supplies configs, vocabulary and
context length; a flag given anyway must agree, or the error names both values. The oracle is the old
way: a plain state dict with every flag spelled out."""
import json
import types

import numpy as np
import pytest
import torch

from data.files import InputError
from data.images.store import ImageStore
from data.synthetic import COLOURS
from engine.train.config import build_config
from engine.train.flags import parse_args
from launch.zeroshot import main as zeroshot_main
from models import build_clip
from tests.dist.workers.extract_fixture import TEXT, VISION, build_tiny_split, save_tiny_model_file

CONTEXT = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("naming")
    d = build_tiny_split(root)
    store = ImageStore(d["lmdb"])
    image = {"resolution": store.resolution, "mean": store.mean, "std": store.std, "resize": store.resize}
    ids = store.ids()
    store.close()
    state = save_tiny_model_file(d, root / "run" / "model_fp32.pt", CONTEXT, image)
    classes = [c for c, _ in COLOURS]
    (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    with open(root / "labels.jsonl", "w", encoding="utf-8") as f:
        for n, i in enumerate(ids):
            f.write(json.dumps({"image_id": i, "label": classes[n % len(classes)]}, ensure_ascii=False) + "\n")
    d.update(root=root, run=root / "run", state=state)
    return d


def _zeroshot(run, out, *model_flags):
    return zeroshot_main([*model_flags, "--classes", str(run["root"] / "classes.txt"),
                          "--labels", str(run["root"] / "labels.jsonl"), "--image-lmdb", str(run["lmdb"]),
                          "--output", str(out), "--no-progress"])


def test_zeroshot_from_the_run_alone_matches_every_flag_spelled_out(run, tmp_path):
    assert _zeroshot(run, tmp_path / "run.json", "--run", str(run["run"])) == 0
    assert _zeroshot(run, tmp_path / "dir.json", "--weights", str(run["run"])) == 0  # a run dir as the path
    assert _zeroshot(run, tmp_path / "flags.json", "--weights", str(run["weights"]), "--model", VISION,
                     "--text-model", TEXT, "--vocab", str(run["vocab"]),
                     "--context-length", str(CONTEXT)) == 0
    want = json.loads((tmp_path / "flags.json").read_text(encoding="utf-8"))
    for name in ("run.json", "dir.json"):
        got = json.loads((tmp_path / name).read_text(encoding="utf-8"))
        assert got == want
    assert want["images"] == 45


@pytest.mark.parametrize("flags,words", [
    (["--context-length", "30"], ["--context-length 30", "trained with 24"]),
    (["--model", "ViT-demo-64"], ["--model ViT-demo-64", "model_fp32.pt"]),
    (["--weights", "x.pt"], ["give --weights or --run, not both"]),
])
def test_zeroshot_flags_that_disagree_with_the_run_are_refused_naming_both(run, tmp_path, capsys, flags, words):
    assert _zeroshot(run, tmp_path / "z.json", "--run", str(run["run"]), *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err
    assert not (tmp_path / "z.json").exists()


def test_zeroshot_without_a_model_says_how_to_name_one(run, tmp_path, capsys):
    assert _zeroshot(run, tmp_path / "z.json") == 2
    assert "give --weights FILE or --run DIR" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _zeroshot(run, tmp_path / "z.json", "--weights", str(tmp_path / "empty")) == 2
    assert "a folder with neither model_fp32.pt" in capsys.readouterr().err


def test_export_onnx_from_the_run_alone(run, tmp_path):
    pytest.importorskip("onnx", reason="optional: pip install -r tests/requirements-optional.txt")
    from launch.export_onnx import main as export_main

    assert export_main(["--run", str(run["run"]), "--output", str(tmp_path / "onnx"), "--no-check"]) == 0
    meta = json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())
    assert meta["context_length"] == CONTEXT


def _train_args(run, tmp_path, *extra):
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4,
                                                  "gradient_accumulation_steps": 1,
                                                  "gradient_clipping": 1.0}))
    (tmp_path / "img").mkdir(exist_ok=True)
    return parse_args(["--deepspeed_config", str(tmp_path / "ds.json"), "--train-data", str(run["queries"]),
                       "--train-img", str(tmp_path / "img"), "--logs", str(tmp_path / "logs"), "--name", "r",
                       *extra])


def test_train_init_from_a_run_dir_takes_model_vocab_and_context_from_its_record(run, tmp_path):
    cfg = build_config(_train_args(run, tmp_path, "--init-from", str(run["run"])), world_size=1, on_gpu=False)
    assert (cfg.model, cfg.text_model, cfg.context_length) == (VISION, TEXT, CONTEXT)
    assert cfg.vocab == str(run["vocab"]) and cfg.init_from == str(run["run"] / "model_fp32.pt")
    # Flags that agree are accepted; without --init-from the defaults are the seed's.
    agreed = build_config(_train_args(run, tmp_path, "--init-from", str(run["run"]), "--model", VISION,
                                      "--context-length", str(CONTEXT), "--vocab", str(run["vocab"])),
                          world_size=1, on_gpu=False)
    assert agreed == cfg
    plain = build_config(_train_args(run, tmp_path, "--vocab", str(run["vocab"])), world_size=1, on_gpu=False)
    assert (plain.model, plain.text_model, plain.context_length) == ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 52)


@pytest.mark.parametrize("flags,words", [
    (["--context-length", "30"], ["--context-length 30", "trained with 24"]),
    (["--text-model", "BERT-demo"], ["--text-model BERT-demo", "hidden_size"]),
])
def test_train_flags_that_disagree_with_init_from_are_refused_naming_both(run, tmp_path, flags, words):
    with pytest.raises(InputError) as e:
        build_config(_train_args(run, tmp_path, "--init-from", str(run["run"]), *flags), world_size=1, on_gpu=False)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_trainer_loads_init_from_a_run_dir_bit_for_bit(run):
    from engine.train.trainer import Trainer

    cfg = types.SimpleNamespace(init_from=str(run["run"]), clip_weight_path=None, bert_weight_path=None)
    fake = types.SimpleNamespace(cfg=cfg, store=types.SimpleNamespace(resize="squash", path=run["lmdb"]))
    torch.manual_seed(99)
    model = build_clip(VISION, TEXT, vocab_size=run["vocab_size"])
    Trainer._load_weights(fake, model)
    got = model.state_dict()
    assert got.keys() == run["state"].keys()
    assert all(torch.equal(got[k], run["state"][k]) for k in got)
    other = build_clip(VISION, "BERT-demo", vocab_size=run["vocab_size"])  # what the shapes may not say
    with pytest.raises(InputError):
        Trainer._load_weights(fake, other)


def test_a_model_file_and_its_run_dir_name_the_same_model(run):
    from engine.inference.model import load_model

    a, b = load_model(run=str(run["run"])), load_model(str(run["run"] / "model_fp32.pt"))
    assert a.context_length == b.context_length == CONTEXT and a.weights == b.weights
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(a.model.encode_image(x), b.model.encode_image(x))
