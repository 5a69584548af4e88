"""BertTokenizer from a local vocab, fixed context length: [CLS] text [SEP] then [PAD]=0."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

from data.files import InputError

PathLike = Union[str, os.PathLike]
DEFAULT_CONTEXT_LENGTH = 52


def vocab_file(path: PathLike) -> Path:
    """The vocab.txt of a tokenizer folder, or the file itself."""
    path = Path(path)
    return path / "vocab.txt" if path.is_dir() else path


def load_tokenizer(path: PathLike):
    """A folder with vocab.txt (e.g. the Chinese RoBERTa download), or the vocab.txt itself.

    transformers 5.x silently ignores `BertTokenizer(vocab_file=...)` (a 5-token vocab of [UNK]s),
    so the vocab size and the special tokens are checked against the file."""
    from transformers import BertTokenizer

    path = Path(path)
    vocab = vocab_file(path)
    if not vocab.is_file():
        raise InputError(f"{path}: no vocab.txt found")
    if path.is_dir():
        tok = BertTokenizer.from_pretrained(str(path))
    else:
        tok = BertTokenizer(vocab=str(vocab))
    with open(vocab, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if len(tok.get_vocab()) < len(set(lines)) or tok.vocab_size < len(set(lines)):
        raise InputError(f"{vocab}: the tokenizer loaded {len(tok.get_vocab())} tokens, the file has {len(lines)}")
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        # A missing special token would be silently appended by transformers: check the file itself.
        if special not in lines or tok.convert_tokens_to_ids(special) != lines.index(special):
            raise InputError(f"{vocab}: lacks the special token {special} (BERT vocabularies have "
                             f"[PAD] [UNK] [CLS] [SEP] [MASK])")
    if tok.pad_token_id != 0:
        # The text tower's attention mask is input_ids != 0.
        raise InputError(f"{vocab}: [PAD] must be the first line (id 0), it is id {tok.pad_token_id}")
    return tok


def tokenize(tokenizer, texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH):
    """torch.long [B, context_length]: [CLS] tokens [SEP], truncated to fit, padded with 0."""
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    enc = tokenizer(list(texts), max_length=context_length, truncation=True, padding="max_length",
                    return_tensors="pt", return_attention_mask=False, return_token_type_ids=False)
    return enc["input_ids"].long()
