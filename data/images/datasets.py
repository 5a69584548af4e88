"""Map-style datasets over an ImageStore; items hold uint8 images and token ids (the engine
normalises on the device). torch's default collate batches them."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from data.tokenizer import DEFAULT_CONTEXT_LENGTH, tokenize


def _tokenize_unique(texts: Sequence[str], tokenizer, context_length: int,
                     chunk: int = 4096) -> Tuple[torch.Tensor, np.ndarray]:
    """Tokenize each distinct text once, up front (cheap, and a bad vocab shows at start-up).
    Returns (int32 [U, L] token table, int64 [N] row of each text)."""
    index: Dict[str, int] = {}
    rows = np.empty(len(texts), dtype=np.int64)
    for n, t in enumerate(texts):
        rows[n] = index.setdefault(t, len(index))
    unique = list(index)
    parts = [tokenize(tokenizer, unique[i:i + chunk], context_length).to(torch.int32)
             for i in range(0, len(unique), chunk)]
    table = torch.cat(parts) if parts else torch.zeros(0, context_length, dtype=torch.int32)
    return table, rows


class PairDataset(Dataset):
    """(text, image id) pairs -> {"image": uint8 [3,R,R], "input_ids": long [L]}."""

    def __init__(self, pairs: Sequence[Tuple[str, int]], store, tokenizer,
                 context_length: int = DEFAULT_CONTEXT_LENGTH):
        self.store = store
        self.image_ids = np.asarray([int(i) for _, i in pairs], dtype=np.int64)
        self.tokens, self.rows = _tokenize_unique([t for t, _ in pairs], tokenizer, context_length)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(self.store.get(int(self.image_ids[i]))),
                "input_ids": self.tokens[self.rows[i]].long()}

    def __getitems__(self, indices: List[int]) -> List[Dict[str, torch.Tensor]]:
        # DataLoader calls this for a whole batch: one read loop into one array.
        images = torch.from_numpy(self.store.get_many([int(self.image_ids[i]) for i in indices]))
        ids = self.tokens[torch.as_tensor(self.rows[indices])].long()
        return [{"image": images[k], "input_ids": ids[k]} for k in range(len(indices))]


class ImageDataset(Dataset):
    """Image ids -> {"image_id": int, "image": uint8 [3,R,R]} (for feature extraction)."""

    def __init__(self, store, ids: Sequence[int]):
        self.store = store
        self.ids = [int(i) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict:
        return {"image_id": self.ids[i], "image": torch.from_numpy(self.store.get(self.ids[i]))}

    def __getitems__(self, indices: List[int]) -> List[Dict]:
        ids = [self.ids[i] for i in indices]
        images = torch.from_numpy(self.store.get_many(ids))
        return [{"image_id": ids[k], "image": images[k]} for k in range(len(ids))]


class TextDataset(Dataset):
    """Queries -> {"query_id": int, "input_ids": long [L]}."""

    def __init__(self, queries, tokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH):
        self.query_ids = [int(q.query_id) for q in queries]
        self.tokens, self.rows = _tokenize_unique([q.text for q in queries], tokenizer, context_length)

    def __len__(self) -> int:
        return len(self.query_ids)

    def __getitem__(self, i: int) -> Dict:
        return {"query_id": self.query_ids[i], "input_ids": self.tokens[self.rows[i]].long()}
