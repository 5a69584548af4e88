"""Background prefetching of micro-batches (engine.loader.prefetch, engine.loader.batches): the same batches in the
same order as direct iteration, loader errors re-raised with their message, bounded waits for a hung
loader, and no thread left behind; the sampler choice for --shard-local."""
import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.images.datasets import ImageDataset
from data.files import InputError
from data.images.store import ImageStore, ImageStoreWriter
from data.sampler import ShardedSampler
from engine.loader.batches import build_sampler, epoch_batches
from engine.loader.prefetch import Prefetcher

N_IMAGES = 64


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    arrs = rng.integers(0, 256, size=(N_IMAGES, 3, 8, 8), dtype=np.uint8)
    with ImageStoreWriter(tmp_path / "db", 8) as w:
        w.put_many(zip(range(1000, 1000 + N_IMAGES), arrs))
        w.finish()
    store = ImageStore(tmp_path / "db")
    store.get(1000)  # the read transaction is opened in this thread; the prefetch thread reuses it
    return ImageDataset(store, range(1000, 1000 + N_IMAGES))


def _loader(dataset, epoch=2, start=0, batch=4, workers=0):
    sampler = ShardedSampler(len(dataset), 1, 2, seed=3)
    sampler.set_epoch(epoch, start=start)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wait_gone(thread, seconds=10.0):
    end = time.monotonic() + seconds
    while thread.is_alive() and time.monotonic() < end:
        time.sleep(0.01)
    return not thread.is_alive()


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetched_batches_equal_direct_iteration(dataset, workers):
    direct = list(_loader(dataset))
    before = threading.active_count()
    # with workers: processes feeding the thread, the same batches
    with Prefetcher(_loader(dataset, workers=workers), depth=2) as p:
        fetched = list(p)
        assert next(p, None) is None  # stays exhausted
    assert len(fetched) == len(direct) == N_IMAGES // 2 // 4
    assert all(_same(a, b) for a, b in zip(direct, fetched))
    assert not p._thread.is_alive() and threading.active_count() == before


def test_epoch_batches_start_where_a_rank_stopped(dataset):
    sampler = ShardedSampler(len(dataset), 0, 2, seed=3)
    full = list(epoch_batches(dataset, sampler, 5, 0, 4, 0, 3, None, depth=2, timeout_s=30))
    rest = epoch_batches(dataset, sampler, 5, 12, 4, 0, 3, None, depth=3, timeout_s=30)
    assert len(full) == 8 and all(_same(a, b) for a, b in zip(full[3:], list(rest)))
    rest.close()


class _Failing(torch.utils.data.Dataset):
    def __init__(self, inner, bad_index):
        self.inner, self.bad = inner, bad_index

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.bad:
            raise KeyError(f"image id {i} is not in the store at /data/shard-3")
        return self.inner[i]


def test_a_loader_error_is_raised_in_the_consumer_with_its_message(dataset):
    bad = int(_loader(dataset).sampler.epoch_indices()[9])  # in the third batch of 4
    loader = DataLoader(_Failing(dataset, bad), batch_size=4, sampler=_loader(dataset).sampler)
    p = Prefetcher(loader, depth=2)
    got = [next(p), next(p)]
    with pytest.raises(KeyError, match=f"image id {bad} is not in the store at /data/shard-3"):
        next(p)
    assert len(got) == 2 and _wait_gone(p._thread)
    p.close()


def test_close_mid_epoch_ends_the_thread(dataset):
    before = threading.active_count()
    p = Prefetcher(_loader(dataset, batch=1), depth=2)
    next(p)
    time.sleep(0.2)  # the thread has filled the queue and waits for room
    assert p._thread.is_alive()
    p.close()
    assert not p._thread.is_alive() and threading.active_count() == before
    assert next(p, None) is None


def test_a_hung_loader_times_out_and_cannot_keep_the_process_alive():
    release = threading.Event()

    def hung():
        yield {"x": torch.zeros(1)}
        release.wait()  # a read that never returns (until the test lets it go)
        yield {"x": torch.ones(1)}

    p = Prefetcher(hung(), depth=2, timeout_s=0.5)
    assert torch.equal(next(p)["x"], torch.zeros(1))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no batch in 0.5s"):
        next(p)
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    p.close(wait_s=0.2)  # bounded: returns although the thread is stuck
    assert time.monotonic() - t0 < 5
    assert p._thread.is_alive() and p._thread.daemon  # a daemon: it does not hold the process open
    release.set()
    assert _wait_gone(p._thread)  # once unstuck it sees the stop flag and ends


def test_a_thread_that_dies_without_a_word_does_not_hang_the_consumer():
    p = Prefetcher(iter([]), depth=1, timeout_s=30)
    p._queue.get(timeout=5)  # steal the end marker: the thread is gone and nothing will come
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="ended without a batch"):
        next(p)
    assert time.monotonic() - t0 < 5


class _Sharded(torch.utils.data.Dataset):
    def __init__(self, counts, n=None):
        self.shard_pair_counts = counts
        self.n = sum(counts) if n is None else n

    def __len__(self):
        return self.n


def test_shard_local_needs_a_sharded_dataset(dataset):
    assert build_sampler(dataset, 0, 2, 1, False, "q.jsonl").mode == "global"
    with pytest.raises(InputError, match="--shard-local: q.jsonl is not a sharded dataset"):
        build_sampler(dataset, 0, 2, 1, True, "q.jsonl")
    s = build_sampler(_Sharded([10, 20, 30]), 1, 2, 1, True, "ds/")
    assert s.mode == "shard-local" and s.samples_per_rank == 30 and s.shard_sizes == [10, 20, 30]
    with pytest.raises(InputError, match="add up to 60, but it holds 61 pairs"):
        build_sampler(_Sharded([10, 20, 30], n=61), 1, 2, 1, True, "ds/")
