"""BertTokenizer from a local vocab: it really loads, and ids follow [CLS] chars [SEP] [PAD]...."""
import pytest
import torch

from data.files import InputError
from data.tokenizer import load_tokenizer, tokenize

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list("左上角的红色圆形右下蓝")


def _write_vocab(path, tokens):
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def _oracle(text, vocab, L):
    # Independent of transformers: CJK characters are single tokens; anything unknown is [UNK].
    ids = [vocab.index("[CLS]")] + [vocab.index(c) if c in vocab else vocab.index("[UNK]")
                                    for c in text if not c.isspace()][: L - 2] + [vocab.index("[SEP]")]
    return ids + [0] * (L - len(ids))


@pytest.mark.parametrize("as_file", [False, True])
def test_vocab_loads_from_folder_or_file(tmp_path, as_file):
    vocab = SPECIAL + CHARS
    path = _write_vocab(tmp_path / "vocab.txt", vocab)
    tok = load_tokenizer(path if as_file else tmp_path)
    assert len(tok.get_vocab()) == len(vocab)
    texts = ["左上角的红色圆形", "右下 蓝", "红绿"]  # 绿 is not in the vocab
    got = tokenize(tok, texts, context_length=12)
    assert got.dtype == torch.long and got.shape == (3, 12)
    assert got.tolist() == [_oracle(t, vocab, 12) for t in texts]
    assert (got[0] == vocab.index("[UNK]")).sum() == 0


def test_truncation_keeps_cls_and_sep(tmp_path):
    vocab = SPECIAL + CHARS
    tok = load_tokenizer(_write_vocab(tmp_path / "vocab.txt", vocab))
    got = tokenize(tok, "左上角的红色圆形右下蓝", context_length=6)
    assert got.tolist() == [_oracle("左上角的红色圆形右下蓝", vocab, 6)]
    assert got[0, -1] == vocab.index("[SEP]")


def test_bad_vocab_is_refused(tmp_path):
    with pytest.raises(InputError, match="no vocab.txt"):
        load_tokenizer(tmp_path)
    _write_vocab(tmp_path / "vocab.txt", ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "好"])
    with pytest.raises(InputError, match=r"\[PAD\] must be the first line"):
        load_tokenizer(tmp_path)
    _write_vocab(tmp_path / "vocab.txt", ["[PAD]", "[UNK]", "[CLS]", "好"])
    with pytest.raises(InputError, match=r"\[SEP\]"):
        load_tokenizer(tmp_path)
