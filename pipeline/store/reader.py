"""Reading a store: `ActivationStore.open(path)` checks it, then serves rows as float32 and token ids.

Every read is checked: zarr verifies each chunk's crc32c, a failure names the shard file; a shard
that the store claims but that is missing or empty on disk is an error at open, and token ids of
written rows are never the fill value, so damage never reads as zeros.
"""

import asyncio
import math
from collections.abc import Iterator

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.errors import GspError
from pipeline.store.location import open_group
from pipeline.store.meta import StoreMeta

ARRAYS = ("activations", "token_ids")


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bfloat16 is float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounding to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def shard_key(array: str, shard: int) -> str:
    """The file (object key) of one shard of an array, relative to the store."""
    return f"{array}/c/{shard}/0" if array == "activations" else f"{array}/c/{shard}"


def open_arrays(group: zarr.Group, path: str) -> tuple[zarr.Array, zarr.Array]:
    """The store's two arrays; a missing or unreadable array description is a GspError."""
    arrays = []
    for name in ARRAYS:
        try:
            arrays.append(group[name])
        except KeyError:
            raise GspError(f"store {path} has no '{name}' array; it is damaged, harvest it again") from None
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise GspError(f"store {path}: {name}/zarr.json is damaged ({type(e).__name__}); harvest it again "
                           "with --overwrite") from None  # fmt: skip
    return arrays[0], arrays[1]


class ActivationStore:
    """A store opened for reading. `meta` is its typed attributes; rows are read as float32."""

    def __init__(self, group: zarr.Group, path: str, meta: StoreMeta):
        self.group, self.path, self.meta = group, path, meta
        self.activations, self.token_ids = open_arrays(group, path)
        if self.activations.shape[1:] != (meta.d_in,) or self.activations.shape[0] != self.token_ids.shape[0]:
            raise GspError(f"store {path}: its arrays' shapes {self.activations.shape}, {self.token_ids.shape} "
                           f"do not match its attributes (d_in {meta.d_in}); it is damaged")  # fmt: skip

    @classmethod
    def open(cls, path) -> "ActivationStore":
        """Open and check a store; every problem is a GspError naming the store."""
        group = open_group(path, "r")
        store = cls(group, str(path), StoreMeta.from_attrs(dict(group.attrs), str(path)))
        store.check_shards()
        return store

    def check_shards(self) -> None:
        """Every shard that rows_written claims must be on disk and non-empty: a missing or
        zero-byte shard file would read as zeros (and token ids −1) instead of failing."""

        store = self.group.store

        async def size_of(key):
            return await store.getsize(key) if await store.exists(key) else None

        async def sizes(keys):
            out = []
            for i in range(0, len(keys), 64):  # a few requests at once (object stores answer slowly)
                out += await asyncio.gather(*(size_of(k) for k in keys[i : i + 64]))
            return out

        n = math.ceil(self.rows_written / self.shard_rows)
        for name in ARRAYS:
            keys = [f"{self.group.path + '/' if self.group.path else ''}{shard_key(name, s)}" for s in range(n)]
            for shard, nbytes in enumerate(sync(sizes(keys))):
                if not nbytes:
                    what = "missing" if nbytes is None else "empty (0 bytes)"
                    raise GspError(
                        f"store {self.path}: the shard file {shard_key(name, shard)} (rows {self.shard_span(shard)}) "
                        f"is {what}; the store is damaged: restore the file or harvest again with --overwrite"
                    )

    # ---------------------------------------------------------------- what it holds
    @property
    def rows_written(self) -> int:
        return self.meta.rows_written

    @property
    def complete(self) -> bool:
        return self.meta.complete

    @property
    def d_in(self) -> int:
        return self.meta.d_in

    @property
    def context_size(self) -> int:
        return self.meta.context_size

    @property
    def shard_rows(self) -> int:
        return self.meta.shard_rows

    @property
    def chunk_rows(self) -> int:
        return self.meta.chunk_rows

    @property
    def n_rows(self) -> int:
        """Rows the arrays have room for (the planned size, or what was written once complete)."""
        return self.activations.shape[0]

    @property
    def special_ids(self) -> list[int]:
        return self.meta.special_ids

    def shard_span(self, shard: int) -> str:
        return f"{shard * self.shard_rows}..{min((shard + 1) * self.shard_rows, self.n_rows) - 1}"

    # ---------------------------------------------------------------- reading
    def read(self, start: int, stop: int) -> np.ndarray:
        """Activations of rows [start, stop) as float32 (B, D)."""
        raw = self._read(self.activations, start, stop)
        return bf16_bits_to_f32(raw) if self.meta.dtype == "bfloat16" else raw

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids of rows [start, stop) (int32)."""
        ids = self._read(self.token_ids, start, stop)
        if stop <= self.rows_written and len(ids) and ids.min() < 0:
            raise GspError(f"corrupt data in store {self.path}: rows {start}..{stop - 1} hold no token ids "
                           f"(shard {self._files('token_ids', start, stop)} reads as unwritten); "
                           "restore the file or harvest again with --overwrite")  # fmt: skip
        return ids

    def _files(self, name: str, start: int, stop: int) -> str:
        first, last = start // self.shard_rows, (stop - 1) // self.shard_rows
        return ", ".join(f"{name}/c/{s}" for s in range(first, last + 1))

    def _read(self, array: zarr.Array, start: int, stop: int) -> np.ndarray:
        try:
            return array[start:stop]
        except ValueError as e:
            if "checksum" not in str(e):
                raise
            raise GspError(
                f"corrupt data in store {self.path}: rows {start}..{stop - 1} failed their crc32c checksum "
                f"(shard file {self._files(array.name.strip('/'), start, stop)}); restore the file or harvest "
                "again with --overwrite"
            ) from None

    def ordinary_rows(
        self, limit: int, batch: int, part: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches (x (B, D) float32, row indices (B,)) of the first `limit` rows that hold no special
        token, read span by span in store order.

        With `part=(rank, world)` this process reads and serves only spans rank, rank + world, ...:
        every process reads the (small) token ids to know which rows count, and only its own
        share of the activations; together the processes serve each row once.
        """
        rank, world = part
        special = np.array(self.special_ids, dtype=np.int64)
        seen, span = 0, max(batch, self.chunk_rows)
        for index, start in enumerate(range(0, self.rows_written, span)):
            stop = min(start + span, self.rows_written)
            keep = np.flatnonzero(~np.isin(self.read_tokens(start, stop), special))[: limit - seen]
            if index % world == rank and len(keep):
                x = self.read(start, stop)
                for piece in np.array_split(keep, max(1, -(-len(keep) // batch))):
                    if len(piece):
                        yield x[piece], start + piece
            seen += len(keep)
            if seen >= limit:
                return

    def verify(self, advance=lambda n: None) -> None:
        """Read every written row back (checksums, token ids); `advance(rows)` after each shard."""
        for start in range(0, self.rows_written, self.shard_rows):
            stop = min(start + self.shard_rows, self.rows_written)
            self.read(start, stop)
            self.read_tokens(start, stop)
            advance(stop - start)
