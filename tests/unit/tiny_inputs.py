"""Deterministic inputs shared by the model and conversion tests."""
import torch
from torch import nn


def perturb_(module: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Random offsets on every parameter (LayerNorm weights/biases included) so that a swapped or
    mis-mapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def token_batch(vocab=128, lengths=(9, 5, 7), total=11, seed=1):
    """Token ids [len(lengths), total]: random ids (never the pad id 0) then padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
    return ids


def images(n=3, r=32, seed=2):
    return torch.randn(n, 3, r, r, generator=torch.Generator().manual_seed(seed))
