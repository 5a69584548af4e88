"""Fetch the next micro-batches in a background thread while the current step computes.

The thread pulls batches from a loader (the LMDB read and the uint8 batch happen there) and, on CUDA,
pins them and copies them to the device on a side stream, recording an event; the consumer's
stream waits on that event before using the batch, so the copy overlaps compute and is never read
early. On CPU the thread only reads. A bounded queue (`depth` batches, plus one the thread holds
while it waits for room) caps the memory used ahead.

Failure modes, each bounded: an exception in the loader is re-raised in the consumer (the same
exception object: its type and message are kept); a loader that hangs makes `next` raise after
`timeout_s` instead of blocking the rank forever; `close()` stops the thread and waits for it a few
seconds at most. The thread is a daemon, so even a read stuck in the kernel cannot keep the process
alive after the main thread has ended.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Iterable, Optional

import torch

log = logging.getLogger("clip")

_END, _ERROR, _BATCH = "end", "error", "batch"
_POLL_S = 0.1  # how often a blocked put/get looks at the stop flag / the thread


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """fn applied to every tensor in a batch of dicts/lists/tuples (what default_collate makes)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


class Prefetcher:
    """An iterator over `batches`, read `depth` batches ahead in a daemon thread.

    device: where the batches go; a CUDA device gets pinned memory and side-stream copies, anything
    else gets the batches as the loader made them.
    """

    def __init__(self, batches: Iterable, device: Optional[torch.device] = None, depth: int = 2,
                 timeout_s: float = 300.0, name: str = "prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timeout_s = float(timeout_s)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:  # the thread must name the device it copies to
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._source = iter(batches)  # in the caller's thread: a loader that fails to start fails here
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # --- the background thread ----------------------------------------------------------------------

    def _work(self) -> None:
        try:
            if self._cuda:
                torch.cuda.set_device(self.device)  # the current device is per thread
            for batch in self._source:
                if not self._put((_BATCH, self._to_device(batch) if self._cuda else (batch, None))):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put((_ERROR, e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _to_device(self, batch):
        with torch.cuda.stream(self._stream):
            # A tensor already on the device (JPEGs decoded there by engine.loader.jpeg_gpu) stays as it is.
            moved = map_tensors(batch, lambda t: t if t.device.type != "cpu" else (
                t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self._stream)
        return moved, event

    # --- the consumer -------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                kind, payload = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the data loading thread ended without a batch or an error") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the data loader produced no batch in {self.timeout_s:g}s "
                                       "(a hung read? a dead file system?)") from None
        if kind == _END:
            self._done = True
            raise StopIteration
        if kind == _ERROR:
            self._done = True
            raise payload
        batch, event = payload
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            # The tensors were allocated on the side stream and are used on the compute stream.
            map_tensors(batch, lambda t: t.record_stream(compute))
        return batch

    def close(self, wait_s: float = 5.0) -> None:
        """Stop reading ahead and end the thread (waits at most `wait_s`; idempotent)."""
        self._stop.set()
        self._done = True
        self._thread.join(timeout=wait_s)
        if self._thread.is_alive():
            log.warning("the data loading thread did not stop within %.0fs (a read is hanging); "
                        "it is a daemon thread and ends with the process", wait_s)
        else:
            self._source = None  # lets a multi-process loader shut its workers down now
        while not self._queue.empty():  # drop batches read ahead (pinned/device memory)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
