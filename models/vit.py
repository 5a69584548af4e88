"""Vision Transformer with OpenAI CLIP's parameter layout.

Every parameter has the name and shape it has in OpenAI's checkpoints (and in Chinese-CLIP's `visual.*`),
so their state dicts load one to one: conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N.{attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_1, mlp.c_fc, mlp.c_proj,
ln_2}, ln_post, proj. Unlike OpenAI's code we keep activations batch-first and run attention through
`F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPUs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .fused import LayerNorm

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class VisionConfig:
    """Fields as in the architecture JSONs (models/configs/ViT-*.json)."""

    embed_dim: int            # joint image-text feature size (output of `proj`)
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    act: str = "quick_gelu"   # OpenAI's ViTs were trained with QuickGELU; HF calls it "quick_gelu" too

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "act" and (not isinstance(getattr(self, f.name), int) or getattr(self, f.name) <= 0):
                raise ValueError(f"vision config: {f.name} must be a positive integer, got {getattr(self, f.name)!r}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision config: width {self.vision_width} is not a multiple of heads {self.vision_heads}")
        if self.image_resolution % self.vision_patch_size:
            raise ValueError(f"vision config: resolution {self.image_resolution} is not a multiple of "
                             f"patch size {self.vision_patch_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"vision config: act must be one of {ACTIVATIONS}, got {self.act!r}")

    @property
    def grid(self) -> int:
        return self.image_resolution // self.vision_patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention holding nn.MultiheadAttention's parameter names (packed q/k/v)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, n, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, act: str):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width, act)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, act) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: works with frozen inputs, DeepSpeed ZeRO and parameters without grads.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def kept_patches(patches: int, fraction: float) -> int:
    """Patch tokens that patch dropout keeps: int(patches x (1 - fraction)), at least one."""
    return patches if fraction <= 0 else max(1, int(patches * (1.0 - fraction)))


def drop_patches(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the class token (position 0) and a random subset of kept_patches() patch tokens of each
    image, in their original order. Done after the positional embedding is added, so every kept
    token still knows where it came from."""
    b, n, w = x.shape
    patches = n - 1
    keep = kept_patches(patches, fraction)
    if keep >= patches:
        return x
    idx = torch.rand(b, patches, device=x.device).topk(keep, dim=1).indices.sort(1).values + 1
    kept = x.gather(1, idx.unsqueeze(-1).expand(b, keep, w))
    return torch.cat([x[:, :1], kept], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        width = cfg.vision_width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.vision_patch_size, stride=cfg.vision_patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.vision_heads, cfg.act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, cfg.embed_dim))
        # Fraction of patch tokens dropped at random in training (FLIP); a run option, not an
        # architecture field: eval/extraction always see every patch.
        self.patch_dropout = 0.0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # Scaled normal init for training from scratch (the demo); pretrained weights overwrite it.
        cfg = self.config
        width, layers = cfg.vision_width, cfg.vision_layers
        scale = width ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        proj_std = scale * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=scale)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)

    def set_grad_checkpointing(self, enabled: bool = True):
        self.transformer.grad_checkpointing = bool(enabled)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: float [B, 3, R, R], already normalised -> [B, embed_dim] (not L2-normalised)."""
        r = self.config.image_resolution
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, r, r):
            raise ValueError(f"expected images of shape [B, 3, {r}, {r}], got {tuple(pixels.shape)}")
        x = self.conv1(pixels.to(self.conv1.weight.dtype))    # [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)                        # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.training and self.patch_dropout > 0:
            x = drop_patches(x, self.patch_dropout)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj
