"""tests/benchmarks/bench_recipes.py --smoke: the recipes' benchmark runs its two parts at tiny sizes
(so it cannot rot between the runs that fill docs/benchmarks.md), and what it reports holds even
there: a locked image tower's step is cheaper than the unlocked one's."""
import json
import subprocess
import sys

import pytest

from tests.oracles import open_clip_loss
from tests.ranks import REPO, base_env


@pytest.mark.slow
def test_bench_recipes_smoke(tmp_path):
    open_clip_loss()
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "benchmarks" / "bench_recipes.py"), "--smoke",
                           "--json", str(out)], cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {r["impl"] for r in res["siglip"]} == {"ours_ring", "ours_gather", "open_clip_bidir", "open_clip_gather"}
    assert all(r["peak_mb"] > 0 and r["ms"] > 0 for r in res["siglip"])
    lock = {r["variant"]: r for r in res["lock"]}
    assert lock["unlocked"]["vs_unlocked"] == 1.0 and lock["both locked"]["vs_unlocked"] < 1.0
    assert "| 2 | ours_ring |" in proc.stdout and "| 8 | image locked |" in proc.stdout
