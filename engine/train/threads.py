"""Intra-op threads per rank, chosen from the cores this process may really use.

torch defaults to one OpenMP thread per physical core of the machine, whatever else runs there: two
ranks on a 2-core machine then run 4 spinning threads on 2 cores, and one rank at 2 threads beside
other jobs measured 22-30 samples/s against ~400 at 1 thread (OpenMP threads spin-wait for each other
when oversubscribed). So each rank takes its share of the cores it may run on: the CPU affinity mask
(and the cgroup CPU quota, as containers set it) divided by the ranks on this node. An explicit
`--threads N` wins, then an explicit OMP_NUM_THREADS (set by the user, `torchrun`, or DeepSpeed's
`--bind_cores_to_rank`).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Optional, Tuple

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def local_ranks(env: Mapping[str, str]) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE or DeepSpeed's launcher's LOCAL_SIZE."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    return 1


def choose_threads(override: Optional[int], env: Optional[Mapping[str, str]] = None,
                   cores: Optional[int] = None) -> Tuple[int, str]:
    """(threads for this rank, why), without side effects."""
    env = os.environ if env is None else env
    if override:
        return override, f"--threads {override}"
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cores = available_cores() if cores is None else cores
    ranks = local_ranks(env)
    n = max(1, cores // ranks)
    return n, f"{cores} cores available / {ranks} local rank{'s' if ranks > 1 else ''}"


def apply_threads(override: Optional[int] = None) -> Tuple[int, str]:
    """Set torch's intra-op threads for this rank (CPU work: the model on CPU, data preparation)."""
    import torch

    n, why = choose_threads(override)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("intra-op threads per rank: %d (%s)", n, why)
    return n, why
