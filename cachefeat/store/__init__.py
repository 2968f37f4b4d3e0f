"""The store: one Zarr v3 cache per split (layout and metadata, writer, reader, lock, verify, import and
export). Both stages call it; it imports nothing from stage one (cachefeat.extract) or stage two
(cachefeat.train).

    layout.py      array shapes, codecs, metadata fingerprints (docs/cache-format.md)
    writer.py      open_for_writing (lock, create or resume, repair, shards left), write_shard
    validate.py    what a store must be before it is read: the one check of a cache from elsewhere
    confine.py     every file opened, written or deleted lies in the store, never through a link
    reader.py      open_cache -> Cache: metadata, progress, arrays as NumPy
    shard_file.py  feature rows decoded straight from the shard files (checksums checked)
    remote.py      s3:// locations through obstore: bounded reads, the lease, push
    bucket_writer.py  extract --out s3://: a staging folder made from the bucket, shards uploaded as written
    local_copy.py  a bucket cache's shard objects kept on local disk (--local-cache), size-bounded
    lock.py        one writer per store
    verify.py      every chunk read and checked; the shards --repair writes again
    exchange.py    HDF5 and .npy export, HDF5 import
"""
from .layout import (
    CODEC_HELP,
    DEFAULT_CODEC,
    FAILED,
    OK,
    PENDING,
    CacheDamaged,
    CacheError,
    Layout,
    UnsafeStore,
    content_fingerprint,
    diff_meta,
    feature_fingerprint,
    parse_codec,
)
from .lock import StoreLock
from .reader import Cache, open_cache
from .verify import VerifyReport, verify
from .writer import ShardData, StoreWriter, open_for_writing, write_shard

__all__ = ["CODEC_HELP", "DEFAULT_CODEC", "FAILED", "OK", "PENDING", "Cache", "CacheDamaged", "CacheError", "Layout",
           "ShardData", "StoreLock", "StoreWriter", "UnsafeStore", "VerifyReport", "content_fingerprint", "diff_meta",
           "feature_fingerprint", "open_cache", "open_for_writing", "parse_codec", "verify", "write_shard"]
