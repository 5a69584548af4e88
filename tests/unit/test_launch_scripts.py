"""The launch scripts read relative paths from the caller's directory (not the repository's), and a
hostfile that lists a host twice or a NODE_RANK outside it is a one-line error, not a traceback."""
import json
import os
import subprocess
import sys

import pytest

from tests.ranks import REPO, base_env, free_port

MULTI = str(REPO / "launch" / "train_multi_node.sh")
SINGLE = str(REPO / "launch" / "train_single_node.sh")


def _run(script, args, cwd, env=None, timeout=180):
    env = base_env(dict(env or {}, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")))
    return subprocess.run(["bash", script, *args], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("lines,node_rank,message", [
    (["localhost slots=1", "localhost slots=1"], "1",
     "hostfile:3: host localhost is already listed on line 2; list each node once"),
    (["localhost slots=1", "127.0.0.1 slots=1"], "2", "NODE_RANK=2, but hostfile lists 2 node(s)"),
    (["localhost slots=one"], "0", "hostfile:2: expected '<host> slots=<n>'"),
])
def test_bad_hostfile_is_a_one_line_error(tmp_path, lines, node_rank, message):
    (tmp_path / "hostfile").write_text("# relative to the caller's directory\n" + "\n".join(lines) + "\n")
    out = _run(MULTI, ["hostfile", "ds.json", "--name", "x"], tmp_path, {"NODE_RANK": node_rank}, timeout=60)
    assert out.returncode == 2, out
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_missing_hostfile_names_the_callers_directory(tmp_path):
    out = _run(MULTI, ["hostfile", "ds.json"], tmp_path, {"NODE_RANK": "0"}, timeout=60)
    assert out.returncode == 2 and f"hostfile hostfile not found (relative to {tmp_path})" in out.stderr


def test_single_node_reads_a_relative_config_from_the_callers_directory(tmp_path):
    # A config that exists only here, and that train.py rejects at once (no gradient_clipping): the
    # rejection proves this file was read; from the repository's directory it would not be found.
    (tmp_path / "my_ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    out = _run(SINGLE, ["my_ds.json", "1", "--train-data", "q.jsonl", "--train-img", "lmdb", "--vocab", "v.txt"], tmp_path, {"MASTER_PORT": str(free_port())})
    assert out.returncode != 0
    assert "my_ds.json: set gradient_clipping explicitly" in out.stdout + out.stderr, out.stdout[-2000:]


# One user mistake per command: an input that does not exist (build_dataset: a query without images,
# found while its progress bar is drawn). Each must end with one line of its own, argparse's
# `<script>: error: <what is wrong, naming the file>`, exit status 2, and no traceback.
USER_MISTAKES = [
    ("build_lmdb.py", ["--input", "absent.tsv", "--output", "out", "--resolution", "32"], "absent.tsv"),
    ("build_dataset.py", ["--queries", "no_images.jsonl", "--images", "absent.tsv", "--output", "out",
                          "--vocab", "absent.txt", "--resolution", "32"], "no_images.jsonl:1: query 7"),
    ("retrieve.py", ["--image-feats", "absent_feats", "--text-feats", "t", "--output", "p.jsonl"], "absent_feats"),
    ("gallery.py", ["--predictions", "p.jsonl", "--queries", "absent.jsonl", "--images", "lmdb",
                    "--output", "g.html"], "absent.jsonl"),
    ("zeroshot.py", ["--weights", "w.pt", "--classes", "absent.txt", "--labels", "l.jsonl",
                     "--image-feats", "f", "--output", "z.json"], "absent.txt"),
    ("extract.py", ["--weights", "absent.pt", "--image-lmdb", "x", "--output", "o"], "absent.pt"),
    ("convert_weights.py", ["openai-vit", "--input", "absent.pt", "--output", "o.pt"], "absent.pt"),
    ("train.py", ["--train-data", "q.jsonl", "--train-img", "lmdb", "--vocab", "v.txt",
                  "--deepspeed_config", "absent_ds.json"], "absent_ds.json"),
]


@pytest.mark.parametrize("script,args,named", USER_MISTAKES, ids=[m[0] for m in USER_MISTAKES])
def test_a_user_mistake_is_one_line_naming_the_command_and_the_file(tmp_path, script, args, named):
    (tmp_path / "no_images.jsonl").write_text('{"query_id": 7, "query_text": "红色连衣裙", "item_ids": []}\n',
                                              encoding="utf-8")
    out = subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=str(tmp_path),
                         env=base_env({}), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith(f"{script}: error: ") and named in last, out.stderr
