"""The direct shard-file reader returns exactly what zarr returns, for every codec a cache can use, and
refuses (rather than misreads) anything else."""
from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from cachefeat.store import CODEC_HELP, CacheError, open_cache, parse_codec
from cachefeat.store.shard_file import ShardFile, ShardFileError

CODECS = ["zstd:3", "none", "gzip", "blosc-lz4", "blosc-zstd"]
ROWS, SHARD = 23, 8       # three shards, the last one partial


def _array(path, codec="zstd:3", dtype="float16", **kw):
    """A cache-style array: one chunk per row, `SHARD` rows per shard file. Rows 0..7 random, rows 8..15
    partly zero (zero chunks are not stored: they read as the fill value), rows 16..22 never written."""
    shape = (ROWS, 3, 5)
    a = zarr.create_array(str(path), shape=shape, dtype=dtype, chunks=(1, 3, 5), shards=(SHARD, 3, 5),
                          compressors=parse_codec(codec), fill_value=0, **kw)
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(16, 3, 5)) * 50).astype(dtype)
    data[[9, 12]] = 0
    a[:16] = data
    return a


@pytest.mark.parametrize("codec", CODECS)
def test_reads_equal_zarr_for_every_codec(tmp_path, codec):
    a = _array(tmp_path / "a", codec)
    f = ShardFile.open(tmp_path / "a")
    assert f is not None
    want = a[:]
    assert np.array_equal(f.read(slice(None)), want)
    assert np.array_equal(f.read(slice(3, 17)), want[3:17])
    rows = np.array([22, 5, 5, 9, 0, 16, 15, 8, 7, 7])            # any order, repeats, absent chunks
    assert np.array_equal(f.read(rows), want[rows])
    assert f.read(np.zeros(0, np.int64)).shape == (0, 3, 5)
    with pytest.raises(IndexError):
        f.read(np.array([ROWS]))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "float32"])
def test_other_dtypes(tmp_path, dtype):
    a = _array(tmp_path / "a", dtype=dtype)
    assert np.array_equal(ShardFile.open(tmp_path / "a").read(slice(None)), a[:])


def test_index_at_start_and_big_endian(tmp_path):
    for name in ("start", "big"):
        path = tmp_path / name
        if name == "start":
            from zarr.codecs import ShardingCodec, ZstdCodec
            codec = ShardingCodec(chunk_shape=(1, 3, 5), codecs=[BytesCodec(), ZstdCodec(), Crc32cCodec()],
                                  index_location="start")
            a = zarr.create_array(str(path), shape=(ROWS, 3, 5), dtype="float32", chunks=(SHARD, 3, 5),
                                  serializer=codec, compressors=None, fill_value=0)
        else:
            a = zarr.create_array(str(path), shape=(ROWS, 3, 5), dtype="float32", chunks=(1, 3, 5),
                                  shards=(SHARD, 3, 5), serializer=BytesCodec(endian="big"), fill_value=0)
        a[:] = np.arange(ROWS * 15, dtype="float32").reshape(ROWS, 3, 5)
        f = ShardFile.open(path)
        assert f is not None, name
        assert np.array_equal(f.read(slice(None)), a[:]), name
        assert f.read(slice(None)).dtype.isnative


def test_other_layouts_are_left_to_zarr(tmp_path):
    zarr.create_array(str(tmp_path / "plain"), shape=(10, 4), dtype="float32", chunks=(2, 4))
    zarr.create_array(str(tmp_path / "two_rows"), shape=(10, 4), dtype="float32", chunks=(2, 4), shards=(4, 4))
    zarr.create_array(str(tmp_path / "split_cols"), shape=(10, 4), dtype="float32", chunks=(1, 2), shards=(4, 4))
    zarr.create_array(str(tmp_path / "text"), shape=(10,), dtype=str, chunks=(1,), shards=(5,))
    zarr.create_array(str(tmp_path / "nan_fill"), shape=(10, 4), dtype="float32", chunks=(1, 4), shards=(4, 4),
                      fill_value=np.nan)
    for name in ("plain", "two_rows", "split_cols", "text", "nan_fill", "missing"):
        assert ShardFile.open(tmp_path / name) is None, name


def test_damage_raises_instead_of_misreading(tmp_path):
    _array(tmp_path / "a")
    shard = tmp_path / "a" / "c" / "0" / "0" / "0"
    good = shard.read_bytes()
    f = ShardFile.open(tmp_path / "a")
    b = bytearray(good)
    b[10] ^= 0xFF                                    # inside the first chunk
    shard.write_bytes(bytes(b))
    with pytest.raises(ShardFileError, match="chunk 0 fails its checksum"):
        f.read(slice(0, 8))
    assert np.array_equal(f.read(slice(1, 8)), zarr.open_array(str(tmp_path / "a"))[1:8])  # the others read
    b = bytearray(good)
    b[-10] ^= 0xFF                                   # inside the index
    shard.write_bytes(bytes(b))
    with pytest.raises(ShardFileError, match="index fails its checksum"):
        f.read(slice(0, 8))
    shard.write_bytes(good[:40])                     # truncated
    with pytest.raises(ShardFileError):
        f.read(slice(0, 8))


def test_a_damaged_frame_without_checksum_raises(tmp_path):
    from zarr.codecs import ZstdCodec
    a = zarr.create_array(str(tmp_path / "a"), shape=(8, 16), dtype="float32", chunks=(1, 16), shards=(8, 16),
                          compressors=[ZstdCodec()])
    a[:] = np.arange(128, dtype="float32").reshape(8, 16)
    shard = tmp_path / "a" / "c" / "0" / "0"
    b = bytearray(shard.read_bytes())
    b[0] ^= 0xFF                                     # the first chunk's zstd magic number
    shard.write_bytes(bytes(b))
    f = ShardFile.open(tmp_path / "a")
    assert f is not None and not f.chunk_crc
    with pytest.raises(ShardFileError, match="chunk 0 does not decompress"):
        f.read(slice(None))
    assert np.array_equal(f.read(slice(1, 8)), np.arange(16, 128, dtype="float32").reshape(7, 16))


def test_cache_reads_the_same_with_and_without_direct_reads(stage2_caches):
    """Every feature array of a real extracted cache (float16 tokens, CLS, embeddings, uint8 pixels) reads
    the same through the shard files as through zarr, also for layer subsets and row lists."""
    direct, via_zarr = open_cache(stage2_caches["val"]), open_cache(stage2_caches["val"])
    via_zarr.direct_reads = False
    rows = np.array([5, 1, 1, 29, 17])
    for name in [*direct.layout.feature_arrays(), "pixels"]:
        assert direct._read_direct(name, slice(None)) is not None, name
        for r in (slice(None), slice(2, 20), slice(-5, None), rows, np.array([-1, 0])):
            assert np.array_equal(direct.read(name, r), via_zarr.read(name, r)), name
    for layers in ([1, 2], [0, 3]):
        assert np.array_equal(direct.read_cls(rows, layers), via_zarr.read_cls(rows, layers))
    # decoded into a strided place (one layer of a stack) through both paths, rows the same as read() gives
    for cache in (direct, via_zarr):
        for r in (slice(3, 9), rows):
            want = cache.read("tokens/1", r)
            block = np.zeros((len(want), want.shape[1], 2, *want.shape[2:]), cache.read_dtype("tokens/1"))
            assert cache.read("tokens/1", r, out=block[:, :, 1]) is not None
            assert np.array_equal(block[:, :, 1], want) and not block[:, :, 0].any()
    with pytest.raises(ValueError, match="out is"):
        direct.shard_file("tokens/1").read(rows, out=np.zeros((2, 3)))


def test_damaged_chunk_is_still_named_by_the_cache(stage2_caches, tmp_path):
    """A chunk that fails its checksum makes the direct read give way to zarr, whose error names the clip."""
    import shutil
    path = tmp_path / "val.zarr"
    shutil.copytree(stage2_caches["val"], path)
    shard = path / "tokens" / "1" / "c" / "0" / "0" / "0" / "0"
    b = bytearray(shard.read_bytes())
    b[100] ^= 0xFF
    shard.write_bytes(bytes(b))
    with pytest.raises(CacheError, match=r"array tokens/1, clips 0\b.*damaged"):
        open_cache(path).read("tokens/1", slice(0, 8))


def test_every_codec_the_cli_offers_is_tested():
    import re
    offered = {name.split("[")[0] for name in re.split(r", | or ", CODEC_HELP)}
    assert offered == {c.split(":")[0] for c in CODECS}


# ------------------------------------------------------------------------------------------- writing
def _zarr_and_direct(tmp_path, data, codec="zstd:3", dtype="float16", **kw):
    """The same rows written by zarr into array `zarr` and by ShardFile.write into array `direct`."""
    arrays = {}
    for name in ("zarr", "direct"):
        arrays[name] = zarr.create_array(str(tmp_path / name), shape=data.shape, dtype=dtype,
                                         chunks=(1, *data.shape[1:]), shards=(SHARD, *data.shape[1:]),
                                         compressors=parse_codec(codec), fill_value=0, **kw)
    arrays["zarr"][:] = data
    f = ShardFile.open(tmp_path / "direct")
    for shard in range(-(-len(data) // SHARD)):
        f.write(shard, data[shard * SHARD:(shard + 1) * SHARD])
    return arrays


def _shard_files(folder, gzip_times: bool = False):
    """Every shard file's bytes. gzip_times: with each chunk's gzip timestamp (bytes 4-7 of a gzip member,
    the second it was written) and its CRC32C (which covers it) zeroed, since two writers a second apart
    differ there and only there."""
    out = {}
    for p in sorted((folder / "c").rglob("*")):
        if p.is_file():
            data = bytearray(p.read_bytes())
            if gzip_times:
                index = np.frombuffer(bytes(data[-(SHARD * 16 + 4):-4]), "<u8").reshape(SHARD, 2)
                for off, n in index[index[:, 0] != 2 ** 64 - 1].tolist():
                    data[off + 4:off + 8] = bytes(4)
                    data[off + n - 4:off + n] = bytes(4)
                data[-4:] = bytes(4)
            out[p.relative_to(folder)] = bytes(data)
    return out


def _writable_rows(dtype, seed=0):
    """Random rows with the cases zarr treats specially: all-zero rows (left out), -0.0 rows (kept: zarr
    compares a zero fill by bits), a row with one non-zero value, and a short last shard."""
    rng = np.random.default_rng(seed)
    data = (rng.normal(size=(ROWS, 3, 5)) * 50).astype(dtype)
    data[[2, 9, 12]] = 0
    if np.dtype(dtype).kind == "f":
        data[5] = -0.0
        data[13] = np.array(-0.0, dtype)
        data[13, 1, 2] = 1
    return data


@pytest.mark.parametrize("codec", CODECS + ["zstd:1", "gzip:6", "blosc-zstd:3"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8", "uint8", "int32"])
def test_writes_the_bytes_zarr_writes(tmp_path, codec, dtype):
    data = _writable_rows(dtype)
    arrays = _zarr_and_direct(tmp_path, data, codec, dtype)
    gz = codec.startswith("gzip")
    assert _shard_files(tmp_path / "direct", gz) == _shard_files(tmp_path / "zarr", gz)
    assert np.array_equal(arrays["direct"][:], data)                    # zarr reads them back


def test_a_shard_of_fill_values_has_no_file_and_a_rewrite_replaces_the_file(tmp_path):
    data = _writable_rows("float16")
    data[8:16] = 0
    _zarr_and_direct(tmp_path, data)
    assert not (tmp_path / "direct" / "c" / "1").exists() or not any((tmp_path / "direct" / "c" / "1").rglob("*"))
    assert _shard_files(tmp_path / "direct") == _shard_files(tmp_path / "zarr")
    f = ShardFile.open(tmp_path / "direct")
    f.write(0, data[:SHARD] * 2)                                        # replaced whole, no temporary left
    assert np.array_equal(f.read(slice(0, SHARD)), data[:SHARD] * 2)
    assert [p.name for p in f.path(0).parent.iterdir()] == ["0"]
    f.write(0, np.zeros_like(data[:SHARD]))                             # now all fill: the file goes
    assert not f.path(0).exists()


@pytest.mark.parametrize("stage", [None, 4096, 3 * 4096])
@pytest.mark.parametrize("fsync", [True, False])
def test_durable_writes_go_around_the_page_cache_with_the_same_bytes(tmp_path, monkeypatch, stage, fsync):
    """fsync writes take O_DIRECT through the staging buffer (here also buffers smaller than a chunk, so
    chunks span pieces and files end inside, or exactly at the end of, a piece); --no-fsync the buffered
    stream. Both give zarr's bytes."""
    from cachefeat.store import shard_file
    if stage is not None:
        monkeypatch.setattr(shard_file, "STAGE_BYTES", stage)
        monkeypatch.setattr(shard_file, "_stage", threading.local())
    data = _writable_rows("float16")
    data = np.concatenate([data, data[:, :, :1]], axis=2)      # 3*6*2 = 36-byte chunks + crc: unaligned
    arrays = _zarr_and_direct(tmp_path, data, "none", "float16")
    f = ShardFile.open(tmp_path / "direct")
    for shard in range(-(-len(data) // SHARD)):
        w = f.write(shard, data[shard * SHARD:(shard + 1) * SHARD], fsync=fsync)
        assert np.array_equal(w.checksums, f.chunk_checksums(shard))          # what the record will hold
    assert _shard_files(tmp_path / "direct") == _shard_files(tmp_path / "zarr")
    assert np.array_equal(arrays["direct"][:], data)
    if fsync and os.stat(tmp_path).st_dev in shard_file._refuses_direct:
        pytest.skip("the test folder's filesystem refuses O_DIRECT: only the buffered path ran")


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path, monkeypatch, refused_at):
    """Filesystems refuse O_DIRECT when the file is opened (EINVAL) or only when written (an alignment they
    do not take): either way the whole file is written again buffered, and that filesystem is remembered."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    from cachefeat.store import shard_file
    real_open, real_pwrite, direct_fds = os.open, os.pwrite, set()

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds:
            direct_fds.discard(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shard_file.os, "open", refusing_open)
    monkeypatch.setattr(shard_file.os, "pwrite", refusing_pwrite)
    monkeypatch.setattr(shard_file, "_refuses_direct", set())
    data = _writable_rows("float32")
    _zarr_and_direct(tmp_path, data, "zstd:3", "float32")
    assert _shard_files(tmp_path / "direct") == _shard_files(tmp_path / "zarr")
    assert os.stat(tmp_path).st_dev in shard_file._refuses_direct


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_file_writer_threads():
    """A child forked after shards were written (a replacement worker, a user's own fork) has none of the
    parent's threads: the pool it inherits would queue work forever, so it starts its own."""
    from cachefeat.store import writer
    parent_pool = writer._file_writers()
    assert parent_pool.submit(lambda: 1).result() == 1
    pid = os.fork()
    if pid == 0:                                                      # the child: report through the exit code
        try:
            pool = writer._file_writers()
            os._exit(0 if pool is not parent_pool and pool.submit(lambda: 7).result(timeout=30) == 7 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
