"""The chunk checksum table: each chunk's crc32c recorded against its place in the store.

zarr's crc32c codec checks a chunk's bytes against the checksum stored beside them, in the same
shard file: a flipped bit fails, but a whole shard file moved to another shard's name (two files
swapped, one copied over another) is intact and passes, and its rows would be served in the wrong
place. So the writer also records each chunk's crc32c in a small array of its own,

    chunk_crc32c   (n_chunks, 2 + hook points) uint32, one file per shard: chunk_crc32c/c/<shard>/0
                   row c: c, the crc32c of token_ids chunk c, of each hook point's activations chunk c

(columns named in its attribute `columns`), written with the shard's data before the shard is
claimed. A reader compares the crc32c of the bytes it read as chunk c with row c; the first column
binds the table's own files to their place. A chunk's crc32c is that of its bytes as stored
(little endian, the rows past a partial chunk's end holding the fill value), the value zarr's codec
keeps beside it. Stores written before the table (attribute `chunk_crc32c` false or absent) are
read with zarr's per-chunk check alone.
"""

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.errors import GspError

TABLE = "chunk_crc32c"  # the array's name, at the store's root
UNSET = 2**32 - 1  # a row never written


def crc32c(a: np.ndarray) -> int:
    """The crc32c of an array's bytes, little endian (as zarr's bytes codec lays them out)."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    view = a.reshape(-1).view(np.uint8)[:]
    view.flags.writeable = False  # what google_crc32c takes
    return google_crc32c.value(view)


def chunk_crcs(rows: np.ndarray, chunk_rows: int, fill) -> list[int]:
    """The crc32c of each chunk of `rows` (the rows of whole chunks from a chunk's start), the last
    one padded to `chunk_rows` with `fill`, as zarr stores a partial chunk."""
    out = []
    for start in range(0, len(rows), chunk_rows):
        data = rows[start : start + chunk_rows]
        if len(data) < chunk_rows:
            padded = np.full((chunk_rows, *rows.shape[1:]), fill, rows.dtype)
            padded[: len(data)] = data
            data = padded
        out.append(crc32c(data))
    return out


def create_table(group: zarr.Group, hooks: list[str], n_chunks: int, per_shard: int) -> zarr.Array:
    cols = ["chunk", "token_ids", *hooks]
    return group.create_array(
        TABLE, shape=(n_chunks, len(cols)), chunks=(per_shard, len(cols)), dtype="uint32", fill_value=UNSET,
        compressors=[Crc32cCodec()], attributes={"columns": cols},
    )  # fmt: skip


def table_rows(first_chunk: int, tokens: np.ndarray, acts: dict[str, np.ndarray], hooks: list[str],
               chunk_rows: int) -> np.ndarray:  # fmt: skip
    """The table's rows for a shard's data (token ids (N,), activations {hook: (N, D)}) whose first chunk
    is `first_chunk`: (n_chunks, 2 + hook points) uint32."""
    crcs = [chunk_crcs(tokens, chunk_rows, -1)] + [chunk_crcs(acts[h], chunk_rows, 0) for h in hooks]
    chunks = np.arange(first_chunk, first_chunk + len(crcs[0]))
    return np.stack([chunks, *map(np.asarray, crcs)], axis=1).astype(np.uint32)


class ChunkTable:
    """A store's table, read a shard's rows at a time: what chunk c of each array must hold."""

    def __init__(self, array: zarr.Array, per_shard: int, store_path: str):
        self.array, self.per_shard, self.store_path = array, per_shard, store_path
        self.columns = list(array.attrs.get("columns", []))
        self._rows: dict[int, np.ndarray] = {}  # shard -> its rows, once read

    def expected(self, chunk: int, column: str) -> int:
        """The crc32c written for chunk `chunk` of `column` (token_ids or a hook point's name)."""
        if column not in self.columns:
            raise GspError(f"store {self.store_path}: its {TABLE} array has no column '{column}'; it is damaged: "
                           "harvest it again with --overwrite")  # fmt: skip
        shard = chunk // self.per_shard
        rows = self._rows.get(shard)
        if rows is None:
            rows = self._rows[shard] = self._read(shard)
        i = chunk - shard * self.per_shard
        found = int(rows[i, 0]) if i < len(rows) else UNSET
        if found != chunk:
            what = "has no row" if found == UNSET else f"holds chunk {found}'s row"
            raise GspError(f"store {self.store_path}: the checksum file {TABLE}/c/{shard}/0 {what} where chunk "
                           f"{chunk}'s should be (a file moved or replaced?); restore it or harvest again with "
                           "--overwrite")  # fmt: skip
        return int(rows[i, self.columns.index(column)])

    def _read(self, shard: int) -> np.ndarray:
        start = shard * self.per_shard
        try:
            return self.array[start : start + self.per_shard]
        except ValueError as e:
            if "checksum" not in str(e):
                raise
            raise GspError(
                f"corrupt data in store {self.store_path}: the checksum file {TABLE}/c/{shard}/0 failed "
                "its own crc32c checksum; restore it or harvest again with --overwrite"
            ) from None
