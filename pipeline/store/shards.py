"""Whole chunks of a store's arrays, read into a caller's buffer in the stored dtype, checksummed.

The arrays gsp writes are Zarr v3 arrays with one codec, `sharding_indexed`, whose inner chunks are
encoded [bytes (little endian), crc32c] and whose index sits at the end of each shard file, encoded
[bytes, crc32c] too: the layout of the Zarr v3 sharding specification. A shard file is

    chunk 0's bytes, its crc32c (4 bytes) | chunk 1's ... | index: (offset, nbytes) uint64 per chunk, its crc32c

and an (offset, nbytes) of (2⁶⁴ − 1, 2⁶⁴ − 1) is a chunk never written (zarr reads it as the fill value).

For an array so laid out, `ChunkReader.read` reads one chunk with two reads (the shard's index, then
the chunk and its crc32c), checks both checksums and says whether the index holds the chunk at all.
A local store is read with `pread`, straight into the caller's buffer (no intermediate copy, no
decoding): ~10 GB/s from the page cache, where zarr's chunk-by-chunk decoding reads at a few hundred
MB/s. A store at a URL is read the same way through zarr's store (byte-range requests). Any other
array (another codec chain, a big-endian machine) is read through zarr, which checks the same
checksums but cannot tell a chunk never written from one of fill values.
"""

import os
import sys
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.store.checksums import crc32c

EMPTY = 2**64 - 1  # an index entry of a chunk never written
_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


class Corrupt(Exception):
    """A chunk or shard index failed its crc32c checksum (or a shard file is shorter than its index says)."""


class ChunkReader:
    """Reads whole chunks (along the first axis) of one array of a store.

    `folder`: the array's folder on disk, or None for a store that is not a local folder."""

    def __init__(self, array: zarr.Array, folder: Path | None):
        self.array = array
        self.chunk_rows = array.chunks[0]
        self.shard_rows = array.shards[0] if array.shards else self.chunk_rows
        self.per_shard = self.shard_rows // self.chunk_rows
        self.row_shape = array.shape[1:]
        self.dtype = np.dtype(array.dtype)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.plain = self._plain(array)
        self.folder = folder if self.plain else None

    @staticmethod
    def _plain(array: zarr.Array) -> bool:
        """Whether the array's chunks can be read straight from its files (see the module docstring)."""
        if sys.byteorder != "little" or not array.shards:
            return False
        meta = array.metadata.to_dict()
        codecs = meta.get("codecs") or []
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return False
        conf = codecs[0].get("configuration", {})
        full_rows = list(conf.get("chunk_shape", []))[1:] == list(array.shape[1:])
        layout = meta.get("chunk_key_encoding", {})
        default_keys = layout.get("name") == "default" and layout.get("configuration", {}).get("separator") == "/"
        return (
            full_rows
            and list(array.shards[1:]) == list(array.shape[1:])
            and default_keys
            and list(conf.get("codecs", ())) == _INDEX_CODECS
            and list(conf.get("index_codecs", ())) == _INDEX_CODECS
            and conf.get("index_location", "end") == "end"
        )

    def shard_file(self, shard: int) -> Path:
        return self.folder.joinpath("c", str(shard), *("0",) * len(self.row_shape))

    def read(self, chunk: int, out: np.ndarray) -> int | None:
        """Chunk `chunk` (rows chunk·chunk_rows ...) into `out`, a C-contiguous (chunk_rows, *row_shape)
        array of the stored dtype; returns the crc32c of its bytes, or None when the shard index says
        the chunk was never written (`out` then holds the fill value). Raises Corrupt on a checksum
        mismatch, FileNotFoundError when the shard file is not there."""
        if out.shape != (self.chunk_rows, *self.row_shape) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"a chunk buffer must be C-contiguous {self.dtype} {(self.chunk_rows, *self.row_shape)}")
        if not self.plain:
            return self._read_through_zarr(chunk, out)
        shard, inner = divmod(chunk, self.per_shard)
        file = _LocalShard(self.shard_file(shard)) if self.folder else _StoredShard(self.array, shard)
        with file:
            index_bytes = 16 * self.per_shard + 4
            index = file.tail(index_bytes)
            if len(index) < index_bytes:
                raise Corrupt("the shard file is shorter than its index")
            if crc32c(np.frombuffer(index[:-4], np.uint8)).to_bytes(4, "little") != index[-4:]:
                raise Corrupt("the shard index failed its checksum")
            offset, nbytes = (int(v) for v in np.frombuffer(index, "<u8", 2, 16 * inner))
            if offset == EMPTY and nbytes == EMPTY:
                out[...] = self.array.metadata.fill_value
                return None
            want = self.chunk_rows * self.row_bytes
            if nbytes != want + 4 or (file.size is not None and offset + nbytes > file.size - index_bytes):
                raise Corrupt(f"the shard index gives chunk {inner} {nbytes} bytes at {offset}, not {want + 4}")
            stored = file.read_into(memoryview(out.reshape(-1).view(np.uint8)), offset)
        crc = crc32c(out)
        if crc.to_bytes(4, "little") != stored:
            raise Corrupt(f"chunk {inner} of shard {shard} failed its checksum")
        return crc

    def _read_through_zarr(self, chunk: int, out: np.ndarray) -> int:
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.array.shape[0])
        try:
            out[: stop - start] = self.array[start:stop]
        except ValueError as e:
            if "checksum" in str(e):
                raise Corrupt(str(e)) from None
            raise
        out[stop - start :] = self.array.metadata.fill_value  # as stored past the array's end
        return crc32c(out)


class _LocalShard:
    """A shard file on disk, read with pread."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def tail(self, n: int) -> bytes:
        return os.pread(self.fd, min(n, self.size), max(self.size - n, 0))

    def read_into(self, view: memoryview, offset: int) -> bytes:
        """len(view) bytes at `offset` into `view`; returns the 4 bytes after them (the chunk's crc32c)."""
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise Corrupt("the shard file ends before its chunk does")
            done += n
        return os.pread(self.fd, 4, offset + done)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class _StoredShard:
    """A shard file in a zarr store (an fsspec URL), read with byte-range requests."""

    size = None  # unknown without another request; a short answer is caught instead

    def __init__(self, array: zarr.Array, shard: int):
        self.store = array.store_path.store
        coords = (shard, *(0,) * (array.ndim - 1))
        self.key = f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}".lstrip("/")

    def _get(self, byte_range) -> bytes:
        got = sync(self.store.get(self.key, default_buffer_prototype(), byte_range))
        if got is None:
            raise FileNotFoundError(self.key)
        return got.to_bytes()

    def tail(self, n: int) -> bytes:
        return self._get(SuffixByteRequest(n))

    def read_into(self, view: memoryview, offset: int) -> bytes:
        data = self._get(RangeByteRequest(offset, offset + len(view) + 4))
        if len(data) < len(view) + 4:
            raise Corrupt("the shard file ends before its chunk does")
        view[:] = data[: len(view)]
        return data[len(view) :]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
