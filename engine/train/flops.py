"""Model FLOPs per training sample, device peaks, and model FLOPs utilisation (MFU).

Counted as torch.utils.flop_counter counts them: 2 FLOPs per multiply-add of every matmul and
convolution, attention scores and the attention-weighted sum included; element-wise work (norms,
activations, softmax, the loss) is left out, as in the MFU figures of PaLM and torchtitan.
A training step costs 3x the forward (backward = 2x: gradients of inputs and of weights), except the
patch-embedding convolution, whose input (the pixels) needs no gradient: 2x its forward.

The text tower is counted at the full context length (padding positions are computed too), the image
tower at the tokens it really sees: with patch dropout, the class token plus the kept patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from models.vit import kept_patches

# Dense peak TFLOP/s per device in the training precision (tensor cores, no 2:4 sparsity), from NVIDIA's
# data sheets: H100 SXM5 and H200 SXM 989.4 bf16/fp16, H100 PCIe 756, A100 (SXM and PCIe) 312, L40S 362,
# V100 SXM2 125 fp16 (it has no bf16). fp32 rows are the plain (non-tensor-core) FP32 figures. Matched
# by substring of the CUDA device name, first match wins, so the more specific names come first.
_PEAKS = (
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)


def device_peak_tflops(device_name: Optional[str], precision: str) -> Optional[float]:
    """Dense peak TFLOP/s of a CUDA device in this precision ("fp32"/"bf16"/"fp16"); None when the
    device is not in the table (CPUs, unknown GPUs): MFU is then not reported."""
    if not device_name:
        return None
    for key, peaks in _PEAKS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


@dataclass(frozen=True)
class SampleFlops:
    """Forward FLOPs of one image-text pair, per tower, and the training cost of a sample."""
    image: float
    text: float
    patch_embed: float  # part of `image`: the convolution, whose input needs no gradient

    @property
    def forward(self) -> float:
        return self.image + self.text

    @property
    def train(self) -> float:
        return 3 * self.forward - self.patch_embed


def _encoder_layer(tokens: int, width: int, ffn: int) -> float:
    """One pre/post-norm transformer encoder layer: q/k/v + output projections, two MLP matmuls,
    scores q.k and the weighted sum of v (2 x tokens^2 x width each)."""
    return 2 * tokens * (4 * width * width + 2 * width * ffn) + 4 * tokens * tokens * width


def image_tokens(vision, patch_dropout: float = 0.0) -> int:
    """Tokens through the ViT: the class token and the patches kept (all of them in eval)."""
    return 1 + kept_patches(vision.grid ** 2, patch_dropout)


def clip_sample_flops(vision, text, context_length: int, patch_dropout: float = 0.0) -> SampleFlops:
    """FLOPs of one pair through models.clip.CLIP. vision: VisionConfig; text: BertConfig."""
    w, p = vision.vision_width, vision.vision_patch_size
    conv = 2 * vision.grid ** 2 * w * 3 * p * p  # every patch is embedded, dropout comes after
    n = image_tokens(vision, patch_dropout)
    image = conv + vision.vision_layers * _encoder_layer(n, w, 4 * w) + 2 * w * vision.embed_dim
    h = text.hidden_size
    txt = (text.num_hidden_layers * _encoder_layer(context_length, h, text.intermediate_size)
           + 2 * h * vision.embed_dim)
    return SampleFlops(image=float(image), text=float(txt), patch_embed=float(conv))


def throughput(flops_per_sample: float, samples_per_s_per_device: float,
               peak_tflops: Optional[float]) -> Tuple[float, Optional[float]]:
    """(achieved TFLOP/s per device, MFU as a fraction of the peak or None)."""
    tflops = flops_per_sample * samples_per_s_per_device / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


def describe_device() -> Tuple[str, Optional[str]]:
    """(a device label for logs, the CUDA device name or None on CPU)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return name, name
    return "cpu", None
