"""The README's route from a DeepSpeed checkpoint to --init-from: DeepSpeed's zero_to_fp32 on a
2-rank ZeRO-2 checkpoint of ours gives the weights the run exported at the same step, and they load
as a whole model (what --init-from does)."""
import subprocess
import sys

import torch

from models import build_clip
from models.weights import load_pretrained_clip, read_clip_weights
from models.weights.model_file import read_model_file
from tests.dist.workers.engine_common import make_data, train_argv, write_ds
from tests.ranks import assert_all_ok, base_env, run_ranks


def test_zero2_checkpoint_through_zero_to_fp32_is_the_export(tmp_path):
    data = make_data(tmp_path / "data")
    ds = write_ds(tmp_path / "ds.json", stage=2, micro=8)
    logs = tmp_path / "runs"
    flags = ["--max-steps", "2", "--save-every-steps", "2", "--save-frequency", "0", "--export"]
    assert_all_ok(run_ranks(train_argv(data, ds, logs, "z", flags), timeout=600))
    ckpt = logs / "z" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert tag == "step_00000002"
    script = ckpt / "zero_to_fp32.py"  # DeepSpeed copies it beside ZeRO checkpoints
    assert script.is_file()
    out = subprocess.run([sys.executable, str(script), str(ckpt), str(tmp_path / "cons"), "--tag", tag],
                         cwd=str(tmp_path), env=base_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    consolidated = tmp_path / "cons" / "pytorch_model.bin"
    state, _ = read_clip_weights(consolidated)  # torch.load(weights_only=True) underneath
    exported = read_model_file(logs / "z" / "model_fp32.pt")[0]
    params = {k for k in exported if k in state}
    assert params and set(state) <= set(exported)
    for k in params:
        torch.testing.assert_close(state[k].float(), exported[k].float(), rtol=0, atol=1e-6)
    vocab = exported["bert.embeddings.word_embeddings.weight"].shape[0]
    model = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=vocab)
    load_pretrained_clip(model, consolidated)
    assert torch.equal(model.state_dict()["text_projection"], exported["text_projection"])
