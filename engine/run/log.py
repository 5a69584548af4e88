"""Run logging: plain log lines (stdout + <run>/train.log) and TensorBoard scalars, rank 0 only.

Other ranks log warnings and errors only (prefixed with their rank), so a failure on rank 3 is still
visible but eight copies of every progress line are not. The module is named engine.run.log; inside
it `import logging` still means the standard library (absolute imports).
"""
from __future__ import annotations

import logging
import os
import struct
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

LOGGER_NAME = "clip"


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so log lines do not tear the rank-0 progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never kill training
            self.handleError(record)


class _Held(logging.Handler):
    """Holds rank 0's records until the run dir exists (it is created only once start-up checks
    passed), then replays them into train.log, so the log still starts at the beginning."""

    def __init__(self):
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _route(root: logging.Logger) -> None:
    # engine.* modules log through logging.getLogger(__name__): route them the same way.
    for name in ("engine", "models", "data"):
        lg = logging.getLogger(name)
        lg.handlers[:] = root.handlers
        lg.setLevel(root.level)
        lg.propagate = False


def setup_logging(run_dir: Optional[Path], rank: int) -> logging.Logger:
    """Configure the 'clip' logger (and this package's module loggers) for this rank. On rank 0
    without a run dir yet, records are held for `attach_run_log`."""
    root = logging.getLogger(LOGGER_NAME)
    root.handlers.clear()
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s" if rank == 0 else
                            f"%(asctime)s %(levelname)s [rank {rank}] %(message)s", "%Y-%m-%d %H:%M:%S")
    handler = _TqdmHandler(sys.stdout)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if rank == 0:
        root.addHandler(_Held())
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    _route(root)
    if rank == 0 and run_dir is not None:
        attach_run_log(run_dir)
    return root


def attach_run_log(run_dir: Path) -> None:
    """Rank 0: start <run_dir>/train.log with the records held so far (no-op on other ranks)."""
    root = logging.getLogger(LOGGER_NAME)
    held = [h for h in root.handlers if isinstance(h, _Held)]
    if not held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    fh.setFormatter(root.handlers[0].formatter)
    for record in held[0].records:
        fh.handle(record)
    root.removeHandler(held[0])
    root.addHandler(fh)
    _route(root)


class ScalarWriter:
    """TensorBoard scalars under <run>/tensorboard on rank 0; a no-op elsewhere.

    Events are written synchronously through tensorboardX's record writer (its SummaryWriter
    queues them for a background thread, whose flush() does not wait for the queue), and flushed
    every FLUSH_SECS and whenever the trainer asks: before each checkpoint commits, so a kill after
    a checkpoint never loses the points that led to it (they are not logged again on resume).
    """

    FLUSH_SECS = 10.0

    def __init__(self, log_dir: Optional[Path]):
        self._writer = None
        if log_dir is not None:
            from tensorboardX.event_file_writer import EventsWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            # The file is named by the second it was opened in; two writers in one second (a quick
            # relaunch) would truncate each other's file. The nanoseconds within that second keep
            # them apart and in time order (TensorBoard reads a folder's files in name order).
            suffix = f".{time.time_ns() % 10 ** 9:09d}.{os.getpid()}"
            self._writer = EventsWriter(str(Path(log_dir) / "events"), filename_suffix=suffix)
            self._flushed = time.monotonic()

    def add(self, step: int, values: Dict[str, Optional[float]]) -> None:
        if self._writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for tag, value in values.items():
            if value is not None:
                self._writer.write_event(Event(wall_time=now, step=int(step), summary=scalar(tag, float(value))))
        if time.monotonic() - self._flushed > self.FLUSH_SECS:
            self.flush()

    def restart_at(self, step: int) -> None:
        """Tell TensorBoard that this run continues at `step`: it drops the points of step >= `step`
        written before (a SessionLog START event, what SummaryWriter(purge_step=...) writes). A
        resume re-runs the steps between its checkpoint and the kill; without this their points
        would appear twice, the old and the new value side by side."""
        if self._writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._writer.write_event(Event(wall_time=time.time(), step=int(step),
                                       session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_events(log_dir: Path) -> Iterator:
    """Every event in the TensorBoard event files of log_dir, files in name (= time) order.

    Parses the TFRecord framing (length, crc, payload, crc) with tensorboardX's Event proto, so it
    needs neither TensorFlow nor the tensorboard package.
    """
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            if len(payload) < length:  # a record cut short by a crash: stop here
                break
            yield Event.FromString(payload)


def read_scalars(log_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar in log_dir as TensorBoard shows it: {tag: [(step, value)]}. Like TensorBoard, a
    SessionLog START event at step s (ScalarWriter.restart_at) drops the points of step >= s read
    before it."""
    from tensorboardX.proto.event_pb2 import SessionLog

    out: Dict[str, List[Tuple[int, float]]] = {}
    for event in read_events(log_dir):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            out = {tag: [p for p in points if p[0] < event.step] for tag, points in out.items()}
        for v in event.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out
