"""Start-up validation of the training flags and DeepSpeed JSONs: bad input fails at once with a
message that says what to change; every shipped ds_config is valid."""
import json
from pathlib import Path

import pytest

from data.files import InputError
from engine.train.config import build_config
from engine.train.ds_settings import load_ds_settings
from engine.train.flags import parse_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"query_id": 1, "query_text": "a", "item_ids": [1]}\n')
    (tmp_path / "img").mkdir()
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    return tmp_path


def ds(tmp_path, name="ds.json", **cfg):
    base = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    base.update(cfg)
    base = {k: v for k, v in base.items() if v is not None}
    p = tmp_path / name
    p.write_text(json.dumps(base))
    return str(p)


def argv(files, ds_path, *extra):
    return ["--deepspeed_config", ds_path, "--train-data", str(files / "q.jsonl"), "--train-img",
            str(files / "img"), "--vocab", str(files / "vocab.txt"), "--model", "ViT-tiny-test",
            "--text-model", "BERT-tiny-test", "--logs", str(files / "logs"), "--name", "r", *extra]


def cfg_of(files, ds_path, *extra, world=1, gpu=False):
    return build_config(parse_args(argv(files, ds_path, *extra)), world_size=world, on_gpu=gpu)


def test_a_valid_run_resolves_batches_and_defaults(files):
    c = cfg_of(files, ds(files, gradient_accumulation_steps=2), world=2)
    assert (c.ds.micro_batch, c.ds.grad_accum, c.ds.global_batch) == (4, 2, 16)
    assert (c.lr, c.wd, c.warmup, c.context_length) == (8e-5, 0.001, 500, 52)  # the seed's defaults
    assert c.local_loss and c.accumulation == "exact" and c.ds.precision == "fp32"
    assert c.run_dir == files / "logs" / "r"



def test_sampling_mode_is_global_unless_shard_local(files):
    assert (cfg_of(files, ds(files)).shard_local, cfg_of(files, ds(files)).sampling) == (False, "global")
    c = cfg_of(files, ds(files), "--shard-local")
    assert c.shard_local and c.sampling == "shard-local" and c.to_dict()["shard_local"] is True


def test_resume_refuses_another_sampling_mode():
    """A checkpoint records its sampling mode; resuming it in the other mode would not be exact."""
    from engine.run.resume import RunShape, check

    saved = {"world_size": 1, "micro_batch": 4, "grad_accum": 1, "train_pairs": 40, "zero_stage": 2,
             "precision": "fp32", "epoch": 0, "step_in_epoch": 3}
    run = lambda sampling: RunShape(1, 4, 1, 40, 2, "fp32", sampling)  # noqa: E731
    check(dict(saved), run("global"), "ckpt")  # a checkpoint from before the mode was recorded counts as global
    with pytest.raises(InputError, match="saved with sampling=global, now sampling=shard-local"):
        check(dict(saved), run("shard-local"), "ckpt")
    saved["sampling"] = "shard-local"
    check(dict(saved), run("shard-local"), "ckpt")
    with pytest.raises(InputError, match="saved with sampling=shard-local, now sampling=global"):
        check(dict(saved), run("global"), "ckpt")
    # shard-local order depends on the world size: another world size is refused even with the same global batch
    with pytest.raises(InputError, match="shard-local order depends on the world size"):
        check(dict(saved), RunShape(2, 2, 1, 40, 2, "fp32", "shard-local"), "ckpt")


@pytest.mark.parametrize("cfg,world,expect", [
    ({"train_batch_size": 32, "gradient_accumulation_steps": None}, 4, (4, 2, 32)),   # micro 4 x gas 2 x 4
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": 2},
     4, (8, 2, 64)),
    ({"gradient_accumulation_steps": None}, 3, (4, 1, 12)),
])
def test_two_of_three_batch_fields(files, cfg, world, expect):
    c = cfg_of(files, ds(files, **cfg), world=world)
    assert (c.ds.micro_batch, c.ds.grad_accum, c.ds.global_batch) == expect


@pytest.mark.parametrize("cfg,world,needle", [
    ({"train_batch_size": 30}, 2, "train_batch_size 30 != train_micro_batch_size_per_gpu 4"),
    ({"train_batch_size": 20, "gradient_accumulation_steps": None}, 3, "not a multiple"),
    ({"train_micro_batch_size_per_gpu": 0}, 1, "positive integer"),
    ({"train_micro_batch_size_per_gpu": "auto"}, 1, "'auto'"),
    ({"gradient_clipping": None}, 1, "set gradient_clipping explicitly"),
    ({"optimizer": {"type": "Adam"}}, 1, "--lr/--wd"),
    ({"scheduler": {"type": "WarmupLR"}}, 1, "--warmup"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, 1, "enable one"),
    ({"zero_optimization": {"stage": 4}}, 1, "0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, 1, "stage >= 1"),
])
def test_bad_ds_configs_say_what_to_change(files, cfg, world, needle):
    with pytest.raises(InputError, match="ds.json") as e:
        cfg_of(files, ds(files, **cfg), world=world)
    assert needle in str(e.value)


def test_fp16_is_refused_on_cpu_with_a_cpu_config_to_use(files):
    path = ds(files, fp16={"enabled": True})
    with pytest.raises(InputError, match="not supported on CPU") as e:
        cfg_of(files, path, gpu=False)
    assert "cpu_zero0_fp32.json" in str(e.value)
    assert cfg_of(files, path, gpu=True).ds.precision == "fp16"


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_is_valid(files, path):
    on_cpu = path.name.startswith("cpu_")
    for world in (1, 2, 8):
        c = cfg_of(files, str(path), world=world, gpu=not on_cpu)
        assert "gradient_clipping" in c.ds.raw
        assert c.ds.global_batch == c.ds.micro_batch * c.ds.grad_accum * world
        assert c.ds.precision in path.name  # named by content
        assert f"zero{c.ds.zero_stage}" in path.name
        assert c.ds.offload_optimizer == ("offload" in path.name)
    if c.ds.precision == "fp16":
        assert c.ds.raw["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("extra,needle", [
    (["--model", "ViT-nope"], "unknown vision config"),
    (["--text-model", "ViT-B-16"], "unknown text config"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--keep-last", "0"], "--keep-last"),
    (["--val-data", "x.jsonl"], "both --val-data and --val-img"),
    (["--clip-weight-path", "/nonexistent.pt"], "--clip-weight-path /nonexistent.pt"),
    (["--resume", "latest"], "no completed checkpoint"),
    (["--name", "a/b"], "plain name"),
    (["--context-length", "2"], "--context-length"),
])
def test_bad_flags_fail_before_any_work(files, extra, needle):
    with pytest.raises(InputError) as e:
        cfg_of(files, ds(files), *extra)
    assert needle in str(e.value)


def test_missing_inputs_name_the_flag(files):
    path = ds(files)
    a = argv(files, path)
    a[a.index("--train-data") + 1] = str(files / "missing.jsonl")
    with pytest.raises(InputError, match="--train-data .*missing.jsonl: file not found"):
        build_config(parse_args(a), world_size=1, on_gpu=False)
    with pytest.raises(InputError, match="--deepspeed_config .*nope.json"):
        cfg_of(files, str(files / "nope.json"))
    b = argv(files, path)
    i = b.index("--vocab")
    del b[i:i + 2]
    with pytest.raises(InputError, match="--vocab"):
        build_config(parse_args(b), world_size=1, on_gpu=False)


def test_deepspeed_launcher_flags_are_accepted(files):
    # deepspeed.launcher.launch appends --local_rank=N to the script's arguments
    c = build_config(parse_args(["--local_rank=1"] + argv(files, ds(files))), world_size=1, on_gpu=False)
    assert c.ds.micro_batch == 4


def test_load_ds_settings_reports_the_json_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n  oops\n}')
    with pytest.raises(InputError, match=r"broken.json:3: not valid JSON"):
        load_ds_settings(str(p), 1, False)


def test_train_cli_exits_2_with_the_message_before_any_work(files, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", REPO / "launch" / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(argv(files, ds(files, gradient_clipping=None)))
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and "gradient_clipping" in err
    assert not (files / "logs").exists()  # nothing was created
