"""ZeRO 1, 2 and 3 track ZeRO 0 (fp32) over a few optimizer steps of the real trainer on 2 ranks,
and bf16 ZeRO-2 with exact k=2 accumulation follows the same path approximately. Each run exports
its consolidated fp32 state dict, which is what is compared (so the export is tested too).
Riding along in the same processes: --freeze-image-tower with --grad-checkpointing, and
--init-from an exported model file with --export-hf (the transformers folder is loaded back)."""
import torch

from models import build_clip
from models.weights.model_file import read_model_file
from tests.dist.workers.engine_common import REPO, make_data, write_ds
from tests.ranks import assert_all_ok, run_ranks

WORKER = str(REPO / "tests/dist/workers/engine_runs.py")
FLAGS = "--max-steps,4,--export,--save-frequency,0,--lr,5e-4,--warmup,1"


def flat(sd):
    return torch.cat([sd[k].float().reshape(-1) for k in sorted(sd) if sd[k].is_floating_point()])


def test_zero_stages_track_zero0(tmp_path):
    make_data(tmp_path / "data")
    logs = tmp_path / "runs"
    runs = {f"z{s}": write_ds(tmp_path / f"z{s}.json", stage=s, micro=8) for s in range(4)}
    runs["z2bf16"] = write_ds(tmp_path / "z2bf16.json", stage=2, micro=4, gas=2, precision="bf16")
    spec = lambda name: f"{name}:{runs[name]}:{FLAGS}"  # noqa: E731
    # ZeRO 0/1/2 and bf16 share one process per rank; ZeRO-3 needs its own (see the worker)
    extra = [f"frozen:{runs['z1']}:{FLAGS},--freeze-image-tower,--grad-checkpointing",
             # starting from z0's export with a negligible lr must reproduce it
             f"init:{runs['z0']}:--max-steps,1,--export-hf,--save-frequency,0,--lr,1e-20,"
             f"--init-from,{logs / 'z0' / 'model_fp32.pt'}"]
    first = run_ranks([WORKER, str(tmp_path / "data"), str(logs)] + [spec(n) for n in ("z0", "z1", "z2", "z2bf16")]
                      + extra, timeout=600)
    assert_all_ok(first)
    assert_all_ok(run_ranks([WORKER, str(tmp_path / "data"), str(logs), spec("z3")], timeout=600))

    sd = {n: read_model_file(logs / n / "model_fp32.pt")[0] for n in runs}
    assert all(sd[n].keys() == sd["z0"].keys() for n in sd)
    vocab = sd["z0"]["bert.embeddings.word_embeddings.weight"].shape[0]
    record = read_model_file(logs / "z0" / "model_fp32.pt")[1]  # the export describes the model
    assert record["text"]["vocab_size"] == vocab and record["vision"]["image_resolution"] == 32
    assert record["vocab"]["sha256"] and record["image"]["resize"] == "squash"
    torch.manual_seed(123)  # the trainer's default seed: the common starting point
    init = flat(build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=vocab).state_dict())
    ref = flat(sd["z0"])
    update = (ref - init).norm()
    assert update > 1e-3  # four steps really moved the weights
    for n in ("z1", "z2", "z3"):
        assert (flat(sd[n]) - ref).norm() < 1e-3 * update, n
    # bf16 weights round to 8 bits of mantissa in the forward: same direction, not the same digits
    bf = flat(sd["z2bf16"]) - init
    cos = torch.dot(bf, ref - init) / (bf.norm() * update)
    assert cos > 0.9 and (bf.norm() / update - 1).abs() < 0.2, (cos, bf.norm() / update)

    frozen = read_model_file(logs / "frozen" / "model_fp32.pt")[0]
    torch.manual_seed(123)
    start = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=vocab).state_dict()
    moved = {k for k in frozen if frozen[k].is_floating_point() and not torch.equal(frozen[k], start[k].float())}
    assert moved and not any(k.startswith("visual.") for k in moved), sorted(moved)[:5]
    assert "text_projection" in moved and any(k.startswith("bert.") for k in moved)

    init = read_model_file(logs / "init" / "model_fp32.pt")[0]
    assert all(torch.allclose(init[k].float(), sd["z0"][k].float(), rtol=0, atol=1e-6) for k in init)
    assert not torch.allclose(flat(init), flat(start), atol=1e-3)  # it did load z0, not start from scratch

    # --export-hf: transformers loads the run's folder with every weight, sized to the run's tokenizer
    from transformers import BertTokenizer, ChineseCLIPModel

    hf, info = ChineseCLIPModel.from_pretrained(logs / "init" / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.text_config.vocab_size == vocab == len(BertTokenizer.from_pretrained(logs / "init" / "hf"))
    torch.testing.assert_close(hf.text_projection.weight.t(), init["text_projection"], rtol=0, atol=0)
