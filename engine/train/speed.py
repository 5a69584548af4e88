"""Speed options of a training run (--patch-dropout, --compile, --threads) and the throughput figures
the log shows beside samples/s (TFLOP/s per device, MFU).

Kept apart from engine/train/config.py so that file stays about what a run trains on; config.py adds these
flags to its parser and stores the resolved SpeedSettings in TrainConfig.speed.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Optional

from data.files import InputError
from engine.train import flops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedSettings:
    patch_dropout: float = 0.0
    compile: bool = False
    threads: Optional[int] = None  # None: chosen per rank from the cores available (engine.train.threads)


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("speed")
    s.add_argument("--patch-dropout", type=float, default=0.0,
                   help="fraction of image patch tokens dropped at random in training only (FLIP); 0.5 "
                        "about halves the image tower's cost; validation and extraction see every patch")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model through DeepSpeed's engine.compile(); on the 2-core CPU "
                        "with the demo model 1.05-1.13x the samples/s after a one-off ~30 s compile (~2 s with "
                        "inductor's cache warm); see README 'Speed'")
    s.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads per rank (default: OMP_NUM_THREADS if set, else the cores "
                        "this process may use divided by the ranks on this node)")


def speed_settings(args: argparse.Namespace) -> SpeedSettings:
    p = float(getattr(args, "patch_dropout", 0.0) or 0.0)
    if not 0.0 <= p < 1.0:
        raise InputError(f"--patch-dropout must be in [0, 1), got {p}")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    return SpeedSettings(patch_dropout=p, compile=bool(getattr(args, "compile", False)), threads=threads)


class Throughput:
    """TFLOP/s per device and MFU from samples/s, for one run's model and precision."""

    def __init__(self, model, cfg):
        """model: models.CLIP; cfg: engine.train.config.TrainConfig."""
        self.per_sample = flops.clip_sample_flops(model.vision_config, model.text_config, cfg.context_length,
                                                  cfg.speed.patch_dropout).train
        self.device, cuda_name = flops.describe_device()
        self.peak = flops.device_peak_tflops(cuda_name, cfg.ds.precision)
        self.world_size = cfg.world_size
        log.info("%s", self.describe())

    def describe(self) -> str:
        peak = f"{self.peak:g} TFLOP/s peak ({self.device})" if self.peak else f"no known peak for {self.device}"
        return f"{self.per_sample / 1e9:.3g} GFLOP per training sample; MFU against {peak}"

    def figures(self, global_samples_per_s: Optional[float]):
        """(TFLOP/s per device, MFU or None), or (None, None) without a rate."""
        if not global_samples_per_s:
            return None, None
        return flops.throughput(self.per_sample, global_samples_per_s / self.world_size, self.peak)

    @staticmethod
    def text(tflops: Optional[float], mfu: Optional[float]) -> str:
        if tflops is None:
            return ""
        return f" {tflops:.3g} TFLOP/s/device" + (f" MFU {100 * mfu:.1f}%" if mfu is not None else "")
