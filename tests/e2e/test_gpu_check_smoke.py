"""The GPU check's --cpu-smoke mode: the script `make gpu-check` runs on a lent GPU goes through the
same code paths here at tiny sizes, so it cannot rot between the rare sessions that have a GPU."""
import json
import subprocess
import sys

import pytest

from tests.ranks import REPO, base_env


def test_gpu_check_cpu_smoke_reports_every_part(tmp_path):
    out = tmp_path / "report.json"
    # The limits catch a hang; they are wide so that a busy laptop (load 6+) still passes.
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "benchmarks" / "gpu_check.py"), "--cpu-smoke",
                           "--out", str(out), "--timeout", "900"], cwd=REPO, env=base_env(),
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    from engine.train.flops import clip_sample_flops
    from models.config import load_text_config, load_vision_config

    per_sample = clip_sample_flops(load_vision_config("ViT-tiny-test"), load_text_config("BERT-tiny-test"), 16).train
    train = report["train"]
    peer = train["torch.amp + DDP (peer)"]
    assert peer["tried"] == [4, 8] and peer["batch"] == 8  # doubling up to the CPU cap
    for name in ("torch.amp + DDP (peer)", "ZeRO-2 bf16", "ZeRO-3 bf16"):
        row = train[name]
        assert "error" not in row, (name, row)
        assert row["samples_s"] > 0 and row["flops_per_sample"] == per_sample
        assert row["tflops"] == pytest.approx(row["samples_s"] * per_sample / 1e12)
        assert row["mfu"] is None  # no known peak for a CPU
    assert train["ZeRO-2 bf16"]["vs_peer"] == pytest.approx(train["ZeRO-2 bf16"]["samples_s"] / peer["samples_s"])
    assert "CPU" in train["ZeRO-2 fp16"]["skipped"]
    assert report["topk"][0]["exact_on_sample"] is True
    assert report["extract"]["features"] == [64, 24] and report["extract"]["images_s"] > 0
    assert report["optimizer_ms"]["torch AdamW (foreach)"] > 0 and "skipped" in report["optimizer_ms"]
    assert "| ZeRO-3 bf16 | 8 |" in proc.stdout  # the printed table
