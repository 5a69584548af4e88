"""tests/benchmarks/bench_shards.py at a tiny size, so the benchmark does not rot: it builds from
shards and from the tsv, and its table counts the pairs each job built."""
import subprocess
import sys

import pytest

from tests.ranks import REPO, base_env
from tests.real_formats import WEBDATASET_PIP

pytest.importorskip("webdataset", reason=WEBDATASET_PIP)


def test_bench_shards_smoke_run_prints_its_table(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "tests" / "benchmarks" / "bench_shards.py"), "--sizes", "20K,40K",
                        "--per-job", "10000", "--per-tar", "1000", "--dir", str(tmp_path / "b")], cwd=REPO,
                       env=base_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| 20,000 |") or line.startswith("| 40,000 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["2", "4"]  # K jobs = N / --per-job
    # each shard job reads one tar of 1,000 samples x 10 captions: 10,000 pairs
    assert '"job_pairs_shards": 10000' in p.stdout and "whole build of 20,000 pairs" in p.stdout
    assert "reader, samples/s on one 1,000-sample tar: ours" in p.stdout
    assert not (tmp_path / "b").exists()  # deleted without --keep
