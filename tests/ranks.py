"""Start real processes as ranks of one job, for the multi-process tests.

Each rank is a separate `python` process with the environment a launcher would set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). A hard timeout kills the whole group, so a test of a
hang fails instead of hanging CI.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def base_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if extra:
        env.update(extra)
    return env


def run_ranks(argv: Sequence[str], world_size: int = 2, timeout: float = 600,
              env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> List[RankResult]:
    """Run `python *argv` as `world_size` ranks; return each rank's exit code and output.

    On timeout every rank is killed and the results say so (returncode -9, output ends with
    "TIMEOUT"), so the caller's assertion shows what each rank printed.
    """
    port = str(free_port())
    procs = []
    logs = []
    for r in range(world_size):
        rank_env = base_env(env)
        rank_env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size),
                        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(_tmp_log(r), "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *argv], env=rank_env, cwd=str(cwd or REPO),
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
        left = deadline - time.monotonic()
        try:
            p.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    results = []
    for r, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        out = log.read() + ("\nTIMEOUT" if timed_out else "")
        log.close()
        os.unlink(log.name)
        results.append(RankResult(r, p.returncode, out))
    return results


def _tmp_log(rank: int) -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"rank{rank}_", suffix=".log")
    os.close(fd)
    return path


def assert_all_ok(results: List[RankResult]) -> None:
    bad = [r for r in results if r.returncode != 0]
    if bad:
        msg = "\n".join(f"--- rank {r.rank} exit {r.returncode} ---\n{r.output[-4000:]}" for r in bad)
        raise AssertionError(msg)
