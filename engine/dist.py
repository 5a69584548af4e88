"""Every torch.distributed / deepspeed.comm call of the project lives here.

Models and data never see ranks; the engine asks this module. Each helper degrades to the obvious
single-process answer when no process group is initialised, so the same code runs as
`python launch/x.py`, under `torchrun`, and under `deepspeed` (with or without `--hostfile`).

A dead rank must not hang the others: every process group gets a finite timeout, and on NCCL the
async error handling that turns a stuck collective into an exception is switched on.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from typing import Any, List, NoReturn, Optional

import torch
import torch.distributed as tdist

DEFAULT_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_distributed() -> bool:
    """True when a launcher (torchrun, deepspeed, a test harness) set the rank environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _fill_single_process_env() -> None:
    # Without these DeepSpeed falls back to MPI discovery and fails on a missing mpi4py.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(use_deepspeed: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S,
                     always: bool = False) -> None:
    """Join the process group the launcher described.

    use_deepspeed: initialise through deepspeed.comm (needed before deepspeed.initialize);
        otherwise plain torch.distributed with the backend that fits the device.
    always: also create a 1-rank group when no launcher set the environment (DeepSpeed needs one).
    """
    if is_initialized():
        return
    if not launched_distributed():
        if not always:
            return
        _fill_single_process_env()
    # Turn a hung NCCL collective into an error instead of a silent hang (no effect on gloo).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(timeout=timeout, verbose=False)
    else:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend, timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """The device this rank computes on: its GPU when there is one, the CPU otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def _bounded_barrier(timeout_s: float) -> None:
    """Wait until every rank got here, at most timeout_s (gloo); a failed peer ends the wait."""
    try:
        if tdist.get_backend() == "gloo":
            tdist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            tdist.barrier()
    except Exception:  # noqa: BLE001 - a peer already failed: nothing left to wait for
        pass


def exit_process(code: int, timeout_s: float = 60) -> NoReturn:
    """End this process with `code`, the last call of a CLI that may run as one rank of many.

    With a process group: on success wait (bounded) for the other ranks, flush, then os._exit.
    Skipping the interpreter's teardown is deliberate: tearing down gloo's and DeepSpeed's
    communication threads at exit sometimes aborted a rank after all its work was done
    ("terminate called without an active exception", exit -6), which the launcher reports as a
    failed run. Every file we write is closed (and fsynced) before this point.
    """
    if not is_initialized():
        sys.exit(code)
    if code == 0 and world_size() > 1:
        _bounded_barrier(timeout_s)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; gradients flow back to each rank's own slice.

    The backward sums each slice's gradient over ranks (every rank's loss depends on every slice),
    which is what makes a gathered contrastive loss give the exact full-batch gradient after the
    engine averages gradients across ranks. all_reduce + slice instead of reduce_scatter because
    gloo has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ws = tdist.get_world_size()
        ctx.rank, ctx.rows = tdist.get_rank(), tensor.shape[0]
        out = [torch.empty_like(tensor) for _ in range(ws)]
        tdist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order, differentiable. Every rank must pass the same
    number of rows (the samplers drop the ragged tail so this holds)."""
    if world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order (equal row counts), without autograd."""
    if world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    tdist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; row counts may differ between ranks (feature
    shards, per-rank top-k lists). The result is on the input's device; on NCCL a CPU tensor makes
    the trip through this rank's GPU, since NCCL only moves device memory."""
    if world_size() == 1:
        return tensor
    home = tensor.device
    comm = torch.device("cuda", local_rank()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = tensor.to(comm).contiguous()
    counts = all_gather_no_grad(torch.tensor([t.shape[0]], dtype=torch.int64, device=comm)).tolist()
    longest = max(counts)
    if longest == 0:
        return tensor
    if t.shape[0] < longest:
        t = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = all_gather_no_grad(t).split(longest)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(home)


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's picklable object, in rank order. Only our own ranks' objects are unpickled."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's object on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns the tensor for chaining."""
    if world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def shard_range(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> range:
    """Contiguous, near-equal slice of range(n) for a rank (for extraction and retrieval shards;
    unlike the training sampler it keeps every item, so shards may differ by one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))
