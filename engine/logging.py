"""Run logging: plain log lines (stdout + <run>/train.log) and TensorBoard scalars, rank 0 only.

Other ranks log warnings and errors only (prefixed with their rank), so a failure on rank 3 is still
visible but eight copies of every progress line are not. The module is named engine.logging; inside
it `import logging` still means the standard library (absolute imports).
"""
from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

LOGGER_NAME = "clip"


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so log lines do not tear the rank-0 progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never kill training
            self.handleError(record)


def setup_logging(run_dir: Optional[Path], rank: int) -> logging.Logger:
    """Configure the 'clip' logger (and this package's module loggers) for this rank."""
    root = logging.getLogger(LOGGER_NAME)
    root.handlers.clear()
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s" if rank == 0 else
                            f"%(asctime)s %(levelname)s [rank {rank}] %(message)s", "%Y-%m-%d %H:%M:%S")
    handler = _TqdmHandler(sys.stdout)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if rank == 0 and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    # engine.* modules log through logging.getLogger(__name__): route them the same way.
    for name in ("engine", "models", "data"):
        lg = logging.getLogger(name)
        lg.handlers[:] = root.handlers
        lg.setLevel(level)
        lg.propagate = False
    return root


class ScalarWriter:
    """TensorBoard scalars under <run>/tensorboard on rank 0; a no-op elsewhere."""

    def __init__(self, log_dir: Optional[Path]):
        self._writer = None
        if log_dir is not None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(log_dir), flush_secs=10)

    def add(self, step: int, values: Dict[str, Optional[float]]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_scalars(log_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """Read back every scalar from the TensorBoard event files in log_dir: {tag: [(step, value)]}.

    Parses the TFRecord framing (length, crc, payload, crc) with tensorboardX's Event proto, so it
    needs neither TensorFlow nor the tensorboard package.
    """
    from tensorboardX.proto.event_pb2 import Event

    out: Dict[str, List[Tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            if len(payload) < length:  # a record cut short by a crash: stop here
                break
            event = Event.FromString(payload)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out
