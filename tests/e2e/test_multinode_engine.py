"""Two "nodes" x one rank on loopback: launch/train_multi_node.sh with NODE_RANK=0 and 1 on a
two-line hostfile runs DeepSpeed's per-node launcher (deepspeed.launcher.launch --world_info
--node_rank), which is what `deepspeed --hostfile` runs on each host over ssh, around the real
launch/train.py. It runs from the test's own directory with a relative hostfile path: the script
reads it from the caller's directory, not the repository's."""
import json
import os
import subprocess
import sys
import time

from tests.dist.workers.engine_common import REPO, make_data, train_argv, write_ds
from tests.ranks import base_env, free_port


def test_two_nodes_one_rank_each_on_loopback(tmp_path):
    data = make_data(tmp_path / "data")
    ds = write_ds(tmp_path / "ds.json", stage=2, micro=4)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two names for this machine\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    _, *args = train_argv(data, ds, tmp_path / "runs", "mn", ["--max-steps", "3", "--save-frequency", "1",
                                                                   "--export"])
    procs, logs = [], []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w+")
        logs.append(log)
        cmd = ["bash", str(REPO / "launch" / "train_multi_node.sh"), hostfile.name, ds, *args]
        env = base_env({"NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")})
        procs.append(subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline = time.monotonic() + 720
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    run = tmp_path / "runs" / "mn"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["resolved"]["global_batch"] == 8
    assert "world size 2" in (run / "train.log").read_text()
    assert "step 3/3" in outs[0] and "train.py: done at step 3" in outs[0]
    # Node 1's rank trained too (its ZeRO shard of the optimizer state is in the checkpoint, and its
    # launcher saw it exit 0), and left the run's last line to rank 0.
    assert list((run / "checkpoints").glob("*/*zero_pp_rank_1_*optim_states.pt"))
    assert "exits successfully" in outs[1] and "train.py: done" not in outs[1]
    assert (run / "model_fp32.pt").is_file() and (run / "checkpoints" / "latest").is_file()
