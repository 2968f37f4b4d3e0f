"""Reading a cache for stage two: only the arrays asked for, in RAM or streamed whole shards at a time by
worker processes, the same batches either way; one view per video per epoch."""
import shutil

import numpy as np
import pytest

from cachefeat.adapters import CacheMismatch, Needs
from cachefeat.store import CacheError, open_cache
from cachefeat.train.reader import CacheDataset, CachedSource, open_dataset, plan_epoch, select_rows

from helpers import live_children

SEL = Needs(embed=True, cls_layers=(1, 3), token_layers=(2, 3), pixels=True)


def test_streamed_batches_equal_in_memory_batches_in_plan_order(stage2_caches):
    cache = open_cache(stage2_caches["train"])
    assert cache.layout.num_shards == 3
    mem = CachedSource(cache, SEL, 16, seed=3, in_memory="yes")
    assert mem.dataset.in_memory
    for workers in (0, 2):
        src = CachedSource(cache, SEL, 16, seed=3, in_memory="no", workers=workers, buffer_shards=1)
        assert not src.dataset.in_memory
        plan = src.plan(1, train=True)
        assert len(plan) == 3 and all(len(b.shards) == 1 for b in plan)
        got = list(src.batches(1, train=True))
        ref = [mem.dataset.gather(rows) for buf in plan for rows in buf.batches]
        assert len(got) == len(ref) == src.steps(1)
        for g, r in zip(got, ref):
            assert g.keys() == r.keys()
            for k in r:
                assert g[k].dtype == r[k].dtype and np.array_equal(g[k], r[k]), k
    # what the arrays hold: the cache API's values for those rows, in the batch order
    b = ref[0]
    rows = b["row"]
    assert np.array_equal(b["cls"], cache.read_cls(np.sort(rows), layers=[1, 3])[np.argsort(np.argsort(rows))])
    assert b["tokens"].shape == (16, 8, 2, 16, 64) and b["pixels"].shape == (16, 16, 16, 16, 3)
    assert b["pixels"].dtype == np.uint8 and np.array_equal(b["label"], cache.labels()[rows])


def _same(got: list[dict], ref: list[dict]) -> bool:
    return len(got) == len(ref) and all(g.keys() == r.keys() and all(np.array_equal(g[k], r[k]) for k in r)
                                        for g, r in zip(got, ref))


def test_streaming_reads_ahead_across_epochs_and_stays_in_plan_order(stage2_caches):
    """The reader processes go on from one epoch's plan to the next's; whatever the caller does (epochs in
    order, an epoch abandoned halfway, an epoch asked again or skipped, evaluation in between) every epoch
    is the plan's batches in order, and close() ends the processes."""
    cache = open_cache(stage2_caches["train"])
    before = live_children()
    mem = CachedSource(cache, SEL, 16, seed=3, in_memory="yes")
    src = CachedSource(cache, SEL, 16, seed=3, in_memory="no", workers=2, buffer_shards=1)

    def ref(epoch, train=True):
        return [mem.dataset.gather(rows) for buf in src.plan(epoch, train) for rows in buf.batches]

    assert _same(list(src.batches(0, True)), ref(0))
    stream = src._stream
    assert _same(list(src.batches(1, True)), ref(1)) and src._stream is stream      # the same processes went on
    assert _same(list(src.batches(0, False)), ref(0, False))                       # evaluation: its own pass
    assert src._stream is None                                                      # ... and its readers end
    assert _same(list(src.batches(2, True)), ref(2))
    it = src.batches(3, True)
    first = [next(it), next(it)]
    it.close()                                                                      # abandoned after two batches
    assert _same(first, ref(3)[:2])
    assert _same(list(src.batches(3, True)), ref(3))                                # asked again: all of it
    assert _same(list(src.batches(7, True)), ref(7))                                # skipped ahead
    assert len(live_children() - before) == 2
    src.close()
    assert live_children() == before


def test_shard_buffered_order_reads_each_shard_once_and_shuffles_within():
    rows = np.arange(0, 200)
    plan = plan_epoch(rows, shard_rows=50, batch_size=16, seed=0, epoch=0, shuffle=True, buffer_shards=2)
    assert [len(b.shards) for b in plan] == [2, 2]
    for buf in plan:
        served = np.concatenate(buf.batches)
        assert set(served // 50) == set(buf.shards) and len(served) == 100
    order = np.concatenate([np.concatenate(b.batches) for b in plan])
    assert sorted(order) == list(rows) and not np.array_equal(order, rows)
    again = plan_epoch(rows, 50, 16, 0, 0, True, 2)
    assert all(np.array_equal(a, b) for x, y in zip(plan, again) for a, b in zip(x.batches, y.batches))


def test_training_draws_one_view_per_video_each_epoch(stage2_caches):
    val = open_cache(stage2_caches["val"])          # 3 views per video
    valid, videos, labels = val.valid(), val.clip_video(), val.labels()
    picks = [select_rows(valid, videos, labels, seed=0, epoch=e) for e in range(4)]
    for p in picks:
        assert len(p) == val.num_videos and np.array_equal(np.sort(videos[p]), np.arange(val.num_videos))
    views = np.stack([val.clip_view()[p] for p in picks])
    assert len(np.unique(views)) == 3 and not all(np.array_equal(views[0], v) for v in views[1:])
    assert np.array_equal(picks[2], select_rows(valid, videos, labels, seed=0, epoch=2))
    assert len(select_rows(valid, videos, labels, 0, 0, views="all")) == val.num_clips
    assert len(select_rows(valid, videos, labels, 0, 0, train=False)) == val.num_clips


def test_only_the_selected_arrays_are_read(stage2_caches, tmp_path):
    """A copy of the cache without tokens/0 and pixels still serves an adapter that reads neither."""
    copy = tmp_path / "partial.zarr"
    shutil.copytree(stage2_caches["train"], copy)
    shutil.rmtree(copy / "tokens" / "0")
    shutil.rmtree(copy / "pixels")
    partial, full = open_cache(copy), open_cache(stage2_caches["train"])
    sel = Needs(cls_layers=(3,), token_layers=(3,))
    for in_memory in ("yes", "no"):
        a = CacheDataset(partial, sel, in_memory=in_memory).gather(np.array([5, 70, 2]))
        b = CacheDataset(full, sel, in_memory="yes").gather(np.array([5, 70, 2]))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(CacheError, match="array tokens/0 is missing from the store"):
        CacheDataset(partial, Needs(token_layers=(0,)), in_memory="yes")


def test_cache_dataset_python_api(stage2_caches):
    cache = open_cache(stage2_caches["val"])
    ds = open_dataset(cache, embed=True, cls_layers=[3], in_memory="no")
    assert len(ds) == cache.num_clips and not ds.in_memory
    item = ds[4]
    assert tuple(item["embed"].shape) == (8, 32) and tuple(item["cls"].shape) == (8, 1, 64)
    assert (item["video"], item["view"], item["row"]) == (1, 1, 4) and item["label"] == cache.labels()[4]
    mem = open_dataset(cache, embed=True, cls_layers=[3], in_memory="yes")
    assert np.array_equal(mem[4]["cls"].numpy(), item["cls"].numpy())
    assert mem.nbytes() == cache.num_clips * 8 * (32 + 64) * 2      # float16
    with pytest.raises(CacheMismatch, match="needs layers \\[7\\], but the cache holds layers"):
        open_dataset(cache, cls_layers=[7])
    import torch.utils.data as tud
    batch = next(iter(tud.DataLoader(mem, batch_size=5)))
    assert tuple(batch["cls"].shape) == (5, 8, 1, 64) and batch["label"].shape == (5,)


def test_records_of_many_shards_load_in_one_read_as_each_would_alone(stage2_caches):
    cache, alone = open_cache(stage2_caches["train"]), open_cache(stage2_caches["train"])
    cache.load_records([2, 0, 1, 0])
    assert sorted(cache._records) == [0, 1, 2]          # held: record() asks for none of them again
    for s in range(3):
        assert np.array_equal(cache.record(s), alone.record(s))
