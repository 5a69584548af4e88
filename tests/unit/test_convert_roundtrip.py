"""Conversions on a model with its own (small) text vocabulary: every pair of whole-model formats (ours,
Chinese-CLIP's checkpoint, a transformers ChineseCLIPModel folder) round-trips through the real CLI
bit for bit, and a conversion that fails or is killed midway leaves no part of its result."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from models import build_clip
from tests.dist.workers.extract_fixture import TEXT, VISION, build_tiny_split, save_tiny_model_file
from tests.ranks import REPO, base_env
from tests.unit.test_convert import load_cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run's model_fp32.pt whose text tower has the tokenizer's 36 tokens (its config says 128)."""
    root = tmp_path_factory.mktemp("roundtrip")
    d = build_tiny_split(root, n_images=2, n_queries=1)
    assert d["vocab_size"] == 36 and build_clip(VISION, TEXT).text_config.vocab_size == 128
    state = save_tiny_model_file(d, root / "run" / "model_fp32.pt", 16)
    d.update(run=root / "run", state=state)
    return d


def cli(*argv):
    code = load_cli().main([str(a) for a in argv])
    assert code == 0, argv
    return code


def equal(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def ours(path):
    return torch.load(path, weights_only=True)


def chinese_clip(path):
    obj = torch.load(path, weights_only=True)
    assert obj["state_dict"]["module.logit_scale"].dim() == 0  # Chinese-CLIP's layout
    return obj["state_dict"]


def hf(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_ours_to_chinese_clip_and_back(run, tmp_path):
    # Before: to-chinese-clip needed --vision/--text for a run, then refused the 36-token vocabulary.
    cli("to-chinese-clip", "--run", run["run"], "--output", tmp_path / "cn.pt")
    # The vocabulary's size lives in the text config JSON beside it (the named config says 128).
    text_json = tmp_path / "cn.text.json"
    assert text_json.is_file() and not (tmp_path / "cn.vision.json").exists()  # the vision config is a named one
    cli("from-chinese-clip", "--input", tmp_path / "cn.pt", "--output", tmp_path / "back.pt",
        "--vision", VISION, "--text", text_json)
    equal(ours(tmp_path / "back.pt"), run["state"])


def test_ours_to_hf_and_back(run, tmp_path):
    # Before: from-hf crashed (config_to_json_dict) on a folder whose configs match no named config.
    cli("to-hf", "--run", run["run"], "--output", tmp_path / "hf")
    cli("from-hf", "--input", tmp_path / "hf", "--output", tmp_path / "back.pt")
    equal(ours(tmp_path / "back.pt"), run["state"])
    assert (tmp_path / "back.text.json").is_file()
    # The config written beside it reads the file back as a whole model.
    cli("to-chinese-clip", "--input", tmp_path / "back.pt", "--output", tmp_path / "cn.pt",
        "--vision", VISION, "--text", tmp_path / "back.text.json")


def test_plain_state_dict_with_named_configs_sizes_the_vocabulary_from_the_weights(run, tmp_path):
    cli("to-chinese-clip", "--input", run["weights"], "--output", tmp_path / "cn.pt", "--vision", VISION,
        "--text", TEXT)
    cli("from-chinese-clip", "--input", tmp_path / "cn.pt", "--output", tmp_path / "back.pt", "--vision", VISION,
        "--text", TEXT)
    equal(ours(tmp_path / "back.pt"), run["state"])


def test_chinese_clip_to_hf_and_back(run, tmp_path):
    cli("to-chinese-clip", "--run", run["run"], "--output", tmp_path / "cn.pt")
    cli("to-hf", "--input", tmp_path / "cn.pt", "--output", tmp_path / "hf", "--vision", VISION,
        "--text", tmp_path / "cn.text.json", "--vocab", run["vocab"])
    cli("to-chinese-clip", "--input", tmp_path / "hf", "--output", tmp_path / "cn2.pt")  # configs: config.json
    equal(chinese_clip(tmp_path / "cn2.pt"), chinese_clip(tmp_path / "cn.pt"))


def test_hf_to_chinese_clip_and_back(run, tmp_path):
    cli("to-hf", "--run", run["run"], "--output", tmp_path / "hf")
    cli("to-chinese-clip", "--input", tmp_path / "hf", "--output", tmp_path / "cn.pt")
    cli("to-hf", "--input", tmp_path / "cn.pt", "--output", tmp_path / "hf2", "--vision", VISION,
        "--text", tmp_path / "cn.text.json", "--vocab", run["vocab"])
    equal(hf(tmp_path / "hf2"), hf(tmp_path / "hf"))


def _fail_at_second_fsync(exc):
    """os.fsync that does `exc()` on its second call: the second file of a conversion fails to reach
    the disk (an I/O error, or the process killed while writing)."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            exc()
        return real(fd)

    return fsync


@pytest.fixture(scope="module")
def hf_folder(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    cli("to-hf", "--run", run["run"], "--output", out)
    return out


@pytest.mark.parametrize("command", ["from-hf", "to-chinese-clip"])
def test_a_conversion_failing_midway_leaves_no_output(run, hf_folder, tmp_path, monkeypatch, command):
    source = ["--input", hf_folder] if command == "from-hf" else ["--run", run["run"]]
    out = tmp_path / "out"
    out.mkdir()

    def io_error():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", _fail_at_second_fsync(io_error))
    with pytest.raises(OSError):
        load_cli().main([command, *map(str, source), "--output", str(out / "x.pt")])
    assert sorted(p.name for p in out.iterdir()) == []  # neither the results nor their temporaries


KILLED_AT_SECOND_FSYNC = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
calls = []
real = os.fsync
def fsync(fd):
    calls.append(fd)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd)
os.fsync = fsync
from tests.unit.test_convert import load_cli
sys.exit(load_cli().main(sys.argv[2:]))
"""


def test_a_conversion_killed_midway_leaves_no_output_file(hf_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_SECOND_FSYNC, str(REPO), "from-hf", "--input",
                           str(hf_folder), "--output", str(out / "x.pt")], env=base_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # Only hidden temporaries can remain (a killed process cleans nothing); no output name exists.
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
