"""launch/train_two_stage.sh, Chinese-CLIP's two-stage recipe, end to end on one CPU rank: stage 1
trains with the image tower locked (its weights come out unchanged but for the projection), stage 2
starts from stage 1's export and trains every weight; flags the script sets itself are refused."""
import os
import subprocess
import sys

import pytest
import torch

from models import build_clip
from models.weights.model_file import read_model_file
from tests.dist.workers.engine_common import make_data, write_ds
from tests.ranks import REPO, base_env, free_port

SCRIPT = str(REPO / "launch" / "train_two_stage.sh")


def _run(args, env, timeout=600):
    env = base_env(dict(env, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                        MASTER_PORT=str(free_port())))
    return subprocess.run(["bash", SCRIPT, *args], cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_stages(tmp_path):
    data = make_data(tmp_path / "data")
    ds = write_ds(tmp_path / "ds.json", stage=0, micro=8)
    flags = ["--train-data", data["train_data"], "--train-img", data["train_img"], "--vocab", data["vocab"],
             "--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--max-steps", "2", "--warmup", "1",
             "--save-frequency", "0", "--num-workers", "0", "--dist-timeout", "60"]
    logs = tmp_path / "logs"
    out = _run([ds, "1", "two", *flags], {"LOGS": str(logs), "STAGE1_LR": "5e-3", "STAGE2_LR": "5e-3"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stage1 = read_model_file(logs / "two-stage1" / "model_fp32.pt")[0]
    stage2 = read_model_file(logs / "two-stage2" / "model_fp32.pt")[0]
    torch.manual_seed(123)  # the trainer's default seed: stage 1's starting weights
    start = build_clip("ViT-tiny-test", "BERT-tiny-test",
                       vocab_size=stage1["bert.embeddings.word_embeddings.weight"].shape[0]).state_dict()
    visual = [k for k in start if k.startswith("visual.") and k != "visual.proj"]
    assert all(torch.equal(stage1[k], start[k]) for k in visual)  # stage 1: the image tower locked
    assert not torch.equal(stage1["visual.proj"], start["visual.proj"])  # ... its projection trained
    assert any(not torch.equal(stage2[k], stage1[k]) for k in visual)  # stage 2: all of it trains
    assert "init:" in (logs / "two-stage2" / "train.log").read_text()  # ... from stage 1's export

    refused = _run([ds, "1", "x", "--lr", "1e-3", *flags], {"LOGS": str(logs)}, timeout=60)
    assert refused.returncode == 2 and "--lr is set by this script" in refused.stderr
