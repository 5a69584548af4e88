"""Decode a batch of JPEG bytes on the GPU (torchvision's nvjpeg path) for a JPEG built data set.

Device code lives in engine/: data.built.reader hands the stored bytes of a batch to this decoder when the
trainer sets it (a CUDA run reading in its own process); on CPU, data.images.jpeg decodes in threads.
"""
from __future__ import annotations

from typing import List

import torch


class DeviceJpegDecoder:
    def __init__(self, device: torch.device, resolution: int):
        self.device = torch.device(device)
        self.resolution = int(resolution)

    def __call__(self, blobs: List[bytes]) -> torch.Tensor:
        """JPEG bytes -> uint8 [B, 3, R, R] on the device (one batched nvjpeg call)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        batch = torch.stack(images)
        want = (len(blobs), 3, self.resolution, self.resolution)
        if tuple(batch.shape) != want:
            raise ValueError(f"stored JPEGs decoded to {list(batch.shape)}, expected {list(want)}")
        return batch
