"""Query files -> queries and training pairs; start-up check of image ids; datasets through a DataLoader."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.images.datasets import ImageDataset, PairDataset, TextDataset
from data.files import InputError
from data.images.store import ImageStore, ImageStoreWriter
from data.queries import Query, check_ids_present, read_queries, training_pairs
from data.tokenizer import load_tokenizer


def _jsonl(path, objs, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for o in objs:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


QUERIES = [
    {"query_id": 248816, "query_text": "圣诞 抱枕", "item_ids": [1006938]},
    {"query_id": 248817, "query_text": "红色连衣裙", "item_ids": [5, 6, 7]},
    {"query_id": 248818, "query_text": "没有答案"},  # like MUGE's test set
]


def test_read_queries_and_pairs(tmp_path):
    qs = read_queries(_jsonl(tmp_path / "q.jsonl", QUERIES))
    assert qs == [Query(248816, "圣诞 抱枕", [1006938]), Query(248817, "红色连衣裙", [5, 6, 7]),
                  Query(248818, "没有答案", [])]
    assert qs[1].where == f"{tmp_path / 'q.jsonl'}:2"
    assert training_pairs(qs[:2]) == [("圣诞 抱枕", 1006938), ("红色连衣裙", 5), ("红色连衣裙", 6),
                                      ("红色连衣裙", 7)]


def test_training_needs_item_ids(tmp_path):
    qs = read_queries(_jsonl(tmp_path / "q.jsonl", QUERIES))
    with pytest.raises(InputError, match=r"q.jsonl:3: query 248818 has no item_ids"):
        training_pairs(qs)


@pytest.mark.parametrize("line,why", [
    ('{"query_id": 1, "query_text": "好", "item_ids": [1]', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"query_id": "x1", "query_text": "好", "item_ids": [1]}', "query_id"),
    ('{"query_id": 9, "query_text": "", "item_ids": [1]}', "query_text"),
    ('{"query_id": 9, "query_text": "好", "item_ids": ["1"]}', "item_ids"),
    ('{"query_id": 248816, "query_text": "重复", "item_ids": [1]}', "repeats line 1"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, why):
    path = _jsonl(tmp_path / "q.jsonl", QUERIES[:2], raw_lines=[line])
    with pytest.raises(InputError) as e:
        read_queries(path)
    assert str(e.value).startswith(f"{path}:3:") and why in str(e.value)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    ids = [5, 6, 7, 1006938]
    arrs = rng.integers(0, 256, size=(len(ids), 3, 4, 4), dtype=np.uint8)
    with ImageStoreWriter(tmp_path / "db", 4) as w:
        w.put_many(zip(ids, arrs))
        w.finish()
    return ImageStore(tmp_path / "db"), dict(zip(ids, arrs))


def test_missing_id_fails_at_start_up_naming_it(tmp_path, store):
    st, _ = store
    path = _jsonl(tmp_path / "q.jsonl", QUERIES[:2] + [{"query_id": 1, "query_text": "缺", "item_ids": [6, 424242]}])
    qs = read_queries(path)
    with pytest.raises(InputError) as e:
        check_ids_present(qs, st, path)
    assert "424242" in str(e.value) and f"{path}:3" in str(e.value) and "1 image id" in str(e.value)
    with pytest.raises(InputError, match="424242"):
        check_ids_present(training_pairs(qs), st, path)
    check_ids_present(qs[:2], st, path)  # all present: no error


def _vocab(tmp_path, texts):
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars) + "\n",
                                        encoding="utf-8")
    return load_tokenizer(tmp_path)


def test_datasets_batch_through_default_collate(tmp_path, store):
    st, arrs = store
    qs = read_queries(_jsonl(tmp_path / "q.jsonl", QUERIES))
    tok = _vocab(tmp_path, [q.text for q in qs])
    pairs = training_pairs(qs[:2])
    ds = PairDataset(pairs, st, tok, context_length=8)
    batches = list(DataLoader(ds, batch_size=3, shuffle=False))
    images = torch.cat([b["image"] for b in batches])
    ids = torch.cat([b["input_ids"] for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 4, 4)
    assert ids.dtype == torch.long and ids.shape == (4, 8)
    for k, (text, image_id) in enumerate(pairs):
        assert images[k].numpy().tobytes() == arrs[image_id].tobytes()
        n = len(text.replace(" ", ""))
        assert ids[k, 0] == tok.cls_token_id and ids[k, n + 1] == tok.sep_token_id and (ids[k, n + 2:] == 0).all()
    # Single-item access agrees with the batched path.
    assert torch.equal(ds[2]["image"], images[2]) and torch.equal(ds[2]["input_ids"], ids[2])

    img_ds = ImageDataset(st, [7, 5])
    b = next(iter(DataLoader(img_ds, batch_size=2)))
    assert b["image_id"].tolist() == [7, 5] and b["image"][1].numpy().tobytes() == arrs[5].tobytes()
    b = next(iter(DataLoader(TextDataset(qs, tok, 8), batch_size=3)))
    assert b["query_id"].tolist() == [248816, 248817, 248818] and b["input_ids"].shape == (3, 8)


def test_pair_dataset_in_worker_processes(tmp_path, store):
    st, arrs = store
    st.get(5)  # environment opened in the parent before the workers fork
    qs = read_queries(_jsonl(tmp_path / "q.jsonl", QUERIES))
    tok = _vocab(tmp_path, [q.text for q in qs])
    pairs = training_pairs(qs[:2]) * 4
    loader = DataLoader(PairDataset(pairs, st, tok, 8), batch_size=4, num_workers=2)
    images = torch.cat([b["image"] for b in loader])
    assert [im.numpy().tobytes() for im in images] == [arrs[i].tobytes() for _, i in pairs]
