"""Every torch.distributed / deepspeed.comm call of the project lives here.

Models and data never see ranks; the engine asks this module. Each helper degrades to the obvious
single-process answer when no process group is initialised, so the same code runs as
`python launch/x.py`, under `torchrun`, and under `deepspeed` (with or without `--hostfile`).

A dead or hung rank must not hang the others: every process group gets a finite timeout (also the
groups DeepSpeed creates itself), on NCCL the async error handling that turns a stuck collective into
an exception is switched on, and a Watchdog ends a rank whose training step makes no progress.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, List, NoReturn, Optional

import torch
import torch.distributed as tdist

DEFAULT_TIMEOUT_S = 300
JOIN_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHECKOUT = Path(__file__).resolve().parents[1]


def use_checkout_extensions_dir() -> Path:
    """Make this checkout's folder the default TORCH_EXTENSIONS_DIR (the user's wins); return the one in
    use. A DeepSpeed join JIT-builds its CPU comm op there; in torch's one folder per user, checkouts
    with their own venvs rebuild each other's build at every launch. One subfolder per interpreter
    prefix: a build records the source path, and the launcher's shebang may name another venv path."""
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    default = CHECKOUT / ".torch_extensions" / f"{Path(sys.prefix).name}-{tag}"
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default)))


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
    # Joining waits for the slowest rank's start (imports, a busy node), which has nothing to do with
    # a hung peer: give it at least JOIN_TIMEOUT_S, then hold the group's collectives to `timeout`.
    join = max(timeout, datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    _default_group_timeout(join)
    if use_deepspeed:
        import deepspeed

        use_checkout_extensions_dir()
        deepspeed.init_distributed(timeout=join, verbose=False)
        # torch 2.14 renamed all_gather_into_tensor (now all_gather_single) and warns at each call;
        # DeepSpeed's ZeRO still calls the old name, which works the same. Only that one warning.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                                category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    else:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend, timeout=join)
    if join != timeout:
        tdist.set_timeout(timeout)
    _default_group_timeout(timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created from now on in this process.

    DeepSpeed builds its own groups (ZeRO's gradient and norm collectives run on a clone of the
    world group, deepspeed/utils/groups.py) with `torch.distributed.new_group(ranks)` and no timeout,
    and torch then takes its module defaults (30 min on gloo, 10 min on NCCL): a hung peer would
    stall the others for that long whatever --dist-timeout says. torch reads those defaults from
    distributed_c10d's module globals at each new_group call (_get_default_timeout), so setting them
    there reaches every later group; a group created with an explicit timeout keeps its own.
    """
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


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


def comm_failure_line(exc: BaseException, timeout_s: float) -> Optional[str]:
    """One line for a rank that stops because a collective gave up (a peer died or hung), naming the
    timeout so the user knows it was not this rank's own fault; None for any other exception."""
    text = str(exc).strip()
    comm = isinstance(exc, getattr(tdist, "DistError", ())) or (isinstance(exc, RuntimeError) and any(
        k in text for k in ("Timed out", "timed out", "Connection closed", "Connection reset", "NCCL")))
    if not comm or world_size() == 1:
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    return (f"rank {rank()}: a collective failed or made no progress for {timeout_s:g} s (--dist-timeout): "
            f"a peer rank died or hung; ending this rank ({type(exc).__name__}: {first})")


class Watchdog:
    """Ends this process (exit code EXIT_NO_PROGRESS) when an armed section runs longer than
    timeout_s: the backstop behind the process groups' own timeouts, for anything that blocks
    without one. Armed only around the training step (validation and saving have no fixed length;
    their collectives are bounded by the group timeout). A daemon thread: it never keeps a process
    alive, and it needs nothing from the peers, so it fires even when a peer is stopped."""

    EXIT_NO_PROGRESS = 4

    def __init__(self, timeout_s: float, source: str = "--dist-timeout", enabled: bool = True, poll_s: float = 1.0):
        self.timeout_s, self.source, self.enabled = timeout_s, source, enabled
        self._poll_s = min(poll_s, timeout_s / 4)
        self._deadline: Optional[float] = None
        self._what = ""
        if enabled:  # one process alone has no peer to wait for
            threading.Thread(target=self._watch, name="clip-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def armed(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._what, self._deadline = what, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll_s)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                msg = (f"rank {rank()}: no progress for {self.timeout_s:g} s ({self.source}) in {self._what}: "
                       f"a peer rank is dead or hung; ending this rank")
                logging.getLogger("clip").error(msg)  # every rank logs errors (engine/run/log.py)
                print(msg, file=sys.stderr, flush=True)  # also when logging is not set up
                logging.shutdown()
                os._exit(self.EXIT_NO_PROGRESS)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; gradients flow back to each rank's own slice.

    The backward sums each slice's gradient over ranks (every rank's loss depends on every slice),
    which is what makes a gathered contrastive loss give the exact full-batch gradient after the
    engine averages gradients across ranks. all_reduce + slice instead of reduce_scatter because
    gloo has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = tdist.get_rank(), tensor.shape[0]
        return all_gather_no_grad(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order, differentiable. Every rank must pass the same
    number of rows (the samplers drop the ragged tail so this holds)."""
    return tensor if world_size() == 1 else _AllGatherWithGrad.apply(tensor)


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


# --- the sigmoid loss's exchange of text rows (models.sigmoid_loss) -------------------------------

class _AllReduceSumWithGrad(torch.autograd.Function):
    """The sum over ranks; each rank's input gets the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor.clone().contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone().contiguous())


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, differentiable (every rank's share of a loss made into the full loss)."""
    return tensor if world_size() == 1 else _AllReduceSumWithGrad.apply(tensor)


def _shift_right(tensor: torch.Tensor, tag: int):
    """Post: send to the next rank, receive the previous rank's; (buffer, requests to wait on)."""
    ws, r, recv = world_size(), rank(), torch.empty_like(tensor)
    return recv, tdist.batch_isend_irecv([tdist.P2POp(tdist.isend, tensor, (r + 1) % ws, tag=tag),
                                          tdist.P2POp(tdist.irecv, recv, (r - 1) % ws, tag=tag)])


def _visit_ring(local: torch.Tensor, fn, with_grad: bool) -> Optional[torch.Tensor]:
    """Blocks move one rank to the right per step, the next transfer overlapping this step's work; a
    block's gradient travels with it (tag 12, the blocks' is 11), each rank adding its share, and one
    step after the full turn every sum is home. Two blocks and two gradients in memory, whatever W."""
    ws, r = world_size(), rank()
    block, grad_in, grad_reqs, sent = local.contiguous(), None, [], None
    for t in range(ws):
        nxt, reqs = _shift_right(block, 11) if t < ws - 1 else (None, [])
        grad = fn((r - t) % ws, block)
        if with_grad:
            for q in grad_reqs:  # the block's gradient from the ranks it visited before
                q.wait()
            sent = (grad if grad_in is None else grad + grad_in).contiguous()  # alive until sent
            grad_in, grad_reqs = _shift_right(sent, 12)
        for q in reqs:
            q.wait()
        block = block if nxt is None else nxt
    for q in grad_reqs:
        q.wait()
    return grad_in


def _visit_gathered(local: torch.Tensor, fn, with_grad: bool) -> Optional[torch.Tensor]:
    """All blocks gathered at once (memory: every rank's rows); gradients summed by one all-reduce."""
    ws, r, n = world_size(), rank(), local.shape[0]
    blocks, grads = all_gather_no_grad(local).split(n), [None] * ws
    for q in ((r - t) % ws for t in range(ws)):  # the ring's order: both sum the loss alike
        grads[q] = fn(q, blocks[q])
    return all_reduce_sum(torch.cat(grads))[r * n:(r + 1) * n] if with_grad else None


def visit_blocks(local: torch.Tensor, fn, with_grad: bool, how: str = "ring") -> Optional[torch.Tensor]:
    """Show this rank every rank's `local` block (equal shapes everywhere): fn(owner, block) once per
    block, its own first. with_grad: fn returns the gradient for the block it was shown; the result
    is this rank's own block's gradient summed over all ranks. how: "ring" or "gather"."""
    if how not in ("ring", "gather"):
        raise ValueError(f"how must be 'ring' or 'gather', got {how!r}")
    if world_size() == 1:
        return fn(0, local)
    return (_visit_ring if how == "ring" else _visit_gathered)(local, fn, with_grad)
