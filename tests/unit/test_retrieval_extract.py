"""engine.inference.extract with a stand-in model: shards on the batch grid, equal forward counts on every
rank (ZeRO-3 needs them), eval mode restored, low-precision features re-normalised."""
import numpy as np
import pytest
import torch

from engine import dist
from engine.inference import extract


class StandIn(torch.nn.Module):
    """encode_image/encode_text of a fixed linear map; counts forward calls."""

    embed_dim = 6

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(0)).to(dtype))
        self.calls = 0
        self.modes = []

    def encode_image(self, pixels):
        self.calls += 1
        self.modes.append((self.training, torch.is_grad_enabled()))
        out = pixels.reshape(len(pixels), -1).to(self.w.dtype) @ self.w
        return torch.nn.functional.normalize(out, dim=-1)

    def encode_text(self, ids):
        self.calls += 1
        return torch.nn.functional.normalize(ids[:, :6].to(self.w.dtype) + 1, dim=-1)


class FakeStore:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self, ids):
        self._ids = list(ids)

    def ids(self):
        return list(self._ids)

    def get_many(self, ids):
        return np.stack([np.full((3, 4, 4), i % 251, np.uint8) + np.arange(16, dtype=np.uint8).reshape(4, 4)
                         for i in ids])


def as_rank(monkeypatch, r, w):
    monkeypatch.setattr(dist, "rank", lambda: r)
    monkeypatch.setattr(dist, "world_size", lambda: w)


@pytest.mark.parametrize("n,batch,world", [(45, 4, 2), (45, 4, 3), (7, 4, 4), (1, 4, 2), (64, 8, 3)])
def test_shards_cover_all_in_order_with_equal_forward_counts(monkeypatch, n, batch, world):
    store = FakeStore(range(100, 100 + n))
    ids_all, feats_all = extract.encode_images(StandIn(), store, store.ids(), batch, torch.device("cpu"))
    got_ids, got_feats, calls = [], [], []
    for r in range(world):
        as_rank(monkeypatch, r, world)
        model = StandIn()
        ids, feats = extract.encode_images(model, store, store.ids(), batch, torch.device("cpu"))
        if len(ids):  # shards start on the global batch grid
            assert (ids[0] - 100) % batch == 0
        got_ids.append(ids)
        got_feats.append(feats)
        calls.append(model.calls)
    assert len(set(calls)) == 1, calls  # the same number of forwards on every rank
    np.testing.assert_array_equal(np.concatenate(got_ids), ids_all)
    np.testing.assert_array_equal(np.concatenate(got_feats), feats_all)  # same batches -> same bits


def test_text_shards(monkeypatch):
    from data.queries import Query

    class Tok:  # what data.tokenizer.tokenize needs from a tokenizer
        def __call__(self, texts, max_length, **kw):
            return {"input_ids": torch.tensor([[len(t) + j for j in range(max_length)] for t in texts])}

    queries = [Query(10 + i, "x" * (i + 1), [1]) for i in range(9)]
    whole = extract.encode_texts(StandIn(), queries, Tok(), 8, 2, torch.device("cpu"))
    parts = []
    for r in range(2):
        as_rank(monkeypatch, r, 2)
        parts.append(extract.encode_texts(StandIn(), queries, Tok(), 8, 2, torch.device("cpu")))
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole[0])
    np.testing.assert_array_equal(whole[0], [q.query_id for q in queries])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])


def test_eval_mode_restores_flag_and_disables_grad():
    model = StandIn()
    model.train()
    store = FakeStore(range(5))
    with extract.eval_mode(model):
        extract.encode_images(model, store, store.ids(), 2, torch.device("cpu"))
    assert model.training and set(model.modes) == {(False, False)}
    model.eval()
    with pytest.raises(RuntimeError):
        with extract.eval_mode(model):
            raise RuntimeError("boom")
    assert not model.training


def test_bf16_model_features_are_fp32_and_renormalised():
    model = StandIn(torch.bfloat16)
    store = FakeStore(range(9))
    ids, feats = extract.encode_images(model, store, store.ids(), 4, torch.device("cpu"))
    assert feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-6)
