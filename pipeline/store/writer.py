"""Writing a store (harvest only): create it, write whole shards, claim them, mark it complete.

Crash safety: the store is written one whole shard at a time. zarr writes each file to a temporary
name and renames it, so a shard file is either complete or absent. Only after a shard's files (one
per hook point, the token ids and its rows of the checksum table) are in place are the group
attributes (rows_written, the corpus cursor and the running statistics) rewritten, in one write of
zarr.json. A killed harvest therefore leaves a store whose
`rows_written` rows are all valid, and resuming rewrites only what came after.
"""

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync

from pipeline.corpus import Cursor
from pipeline.errors import GspError
from pipeline.faults import fault
from pipeline.store.checksums import TABLE, create_table, table_rows
from pipeline.store.location import filesystem, is_url, open_group, zarr_path
from pipeline.store.meta import ARRAY_DTYPES, STORED_DTYPES, RowSums, StoreMeta, now
from pipeline.store.reader import ActivationStore, open_array


@dataclass(frozen=True)
class Layout:
    """How rows are cut into chunks (the unit of reading) and shards (the unit of writing, one file)."""

    context_size: int
    chunk_contexts: int
    shard_chunks: int

    @property
    def chunk_rows(self) -> int:
        return self.context_size * self.chunk_contexts

    @property
    def shard_rows(self) -> int:
        return self.chunk_rows * self.shard_chunks

    @staticmethod
    def plan(context_size: int, d_in: int, itemsize: int, *, chunk_rows: int = 4096, shard_mib: float = 128):
        """Chunks of about `chunk_rows` rows (whole contexts), shards of about `shard_mib` MiB."""
        context_bytes = context_size * d_in * itemsize
        shard_contexts = max(1, int(shard_mib * 2**20 // context_bytes))
        chunk_contexts = min(max(1, round(chunk_rows / context_size)), shard_contexts)
        shard_chunks = max(1, shard_contexts // chunk_contexts)
        return Layout(context_size, chunk_contexts, shard_chunks)


class StoreWriter:
    """A store opened for writing: shard data of every hook point, claims (commits) in shard order, the end."""

    def __init__(self, group: zarr.Group, path: str, meta: StoreMeta):
        self.group, self.path, self.meta = group, path, meta
        self._open_arrays()

    def _open_arrays(self) -> None:
        self.token_ids = self._array("token_ids")
        self.activations = {h.name: self._array(self.meta.array_path(h)) for h in self.meta.hooks}
        self.table = self._array(TABLE) if self.meta.chunk_crc32c else None

    def _array(self, name: str) -> zarr.Array:
        """An array to write into. Every chunk is written, even one of fill values (zeros): a chunk
        missing from its shard's index is then damage, which readers refuse, never rows of zeros."""
        return open_array(self.group, name, self.path).with_config({"write_empty_chunks": True})

    @property
    def n_rows(self) -> int:
        """Rows the arrays have room for."""
        return self.token_ids.shape[0]

    @classmethod
    def create(cls, path: str | Path, meta: StoreMeta) -> "StoreWriter":
        """A new, empty store at `path` (replacing a gsp store there: the caller has checked that):
        token ids at the root, and a group per hook point holding its activations."""
        if meta.dtype not in STORED_DTYPES:
            raise GspError(f"store dtype '{meta.dtype}' is not supported: use one of {', '.join(STORED_DTYPES)}")
        if is_url(path):
            filesystem(str(path))  # an unknown scheme or a missing package: one clear error
        n_rows = meta.n_contexts_planned * meta.context_size
        group = zarr.open_group(zarr_path(path), mode="w", zarr_format=3)
        bf16 = meta.dtype == "bfloat16"
        for h in meta.hooks:
            about = {"layer": h.layer, "site": h.site, "hook_point": h.hook_point, "d_in": h.d_in, "dtype": meta.dtype}
            home = group if meta.format_version == 1 else group.create_group(h.name, attributes=about)
            home.create_array(
                "activations", shape=(n_rows, h.d_in), chunks=(meta.chunk_rows, h.d_in),
                shards=(meta.shard_rows, h.d_in), dtype=ARRAY_DTYPES[meta.dtype],
                compressors=[Crc32cCodec()], fill_value=0,
                attributes={"dtype": meta.dtype, "note": "bfloat16 bit patterns" if bf16 else ""},
            )  # fmt: skip
        group.create_array(
            "token_ids", shape=(n_rows,), chunks=(meta.chunk_rows,), shards=(meta.shard_rows,), dtype="int32",
            compressors=[Crc32cCodec()], fill_value=-1,
        )  # fmt: skip
        if meta.chunk_crc32c:
            n_chunks = -(-n_rows // meta.chunk_rows)
            create_table(group, [h.name for h in meta.hooks], n_chunks, meta.shard_rows // meta.chunk_rows)
        meta = meta.progressed(created_at=now())
        group.update_attributes(meta.to_attrs())
        return cls(group, str(path), meta)

    @classmethod
    def open(cls, path: str | Path) -> "StoreWriter":
        stores = ActivationStore.open_all(path)  # checks the attributes and every claimed shard
        return cls(open_group(path, "r+"), str(path), stores[0].meta)

    # ---------------------------------------------------------------- shards
    def write_shard_data(self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray) -> None:
        """Write one whole shard's files, one per hook point, the token ids and its rows of the checksum
        table (in any order; nothing is claimed until `commit`)."""
        rows = slice(shard * self.meta.shard_rows, shard * self.meta.shard_rows + len(tokens))
        if set(acts) != set(self.activations):
            raise RuntimeError(f"shard {shard} holds hook points {sorted(acts)}, the store {sorted(self.activations)}")
        writes = [(self.activations[name], rows, a) for name, a in acts.items()] + [(self.token_ids, rows, tokens)]
        if self.table is not None:
            first = shard * (self.meta.shard_rows // self.meta.chunk_rows)
            crcs = table_rows(first, tokens, acts, [h.name for h in self.meta.hooks], self.meta.chunk_rows)
            writes.append((self.table, slice(first, first + len(crcs)), crcs))

        async def every():
            await asyncio.gather(*(array.async_array.setitem(where, a) for array, where, a in writes))

        if is_url(self.path):  # remote filesystems' clients live on zarr's own event loop
            for array, where, a in writes:
                array[where] = a
        else:
            # An event loop per call, rather than zarr's one shared loop: checksumming and assembling
            # shards then runs on as many writer threads as the caller uses, not on one thread.
            asyncio.run(every())
        fault("shard-data-written")

    def commit(self, shard: int, rows: int, cursor: Cursor, sums: dict[str, RowSums]) -> None:
        """Claim shard `shard` (`rows` rows, already written): rows_written, cursor and every hook
        point's statistics at once."""
        start = shard * self.meta.shard_rows
        if start != self.meta.rows_written:
            raise RuntimeError(f"shard {shard} starts at row {start}, but {self.meta.rows_written} rows are written")
        self._update(self.meta.progressed(rows_written=start + rows, cursor=cursor, hooks=self.meta.with_sums(sums)))

    def write_shard(self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray, cursor: Cursor,
                    sums: dict[str, RowSums]) -> None:  # fmt: skip
        self.write_shard_data(shard, acts, tokens)
        self.commit(shard, len(tokens), cursor, sums)

    def finish(self, rows: int) -> None:
        """Mark the store complete; if the corpus ran out early, shrink the arrays to what was written.

        Only the arrays' shapes change: no shard past `rows` was ever written, so nothing is deleted
        (zarr's default resize would visit every planned shard key, which for a huge planned store is
        millions of requests)."""
        if rows < self.n_rows:
            for array in (*self.activations.values(), self.token_ids):
                sync(array.async_array.resize((rows, *array.shape[1:]), delete_outside_chunks=False))
            if self.table is not None:
                n_chunks = -(-rows // self.meta.chunk_rows)
                sync(self.table.async_array.resize((n_chunks, self.table.shape[1]), delete_outside_chunks=False))
        self._update(self.meta.progressed(complete=True))
        self._open_arrays()

    def update(self, **progress) -> None:
        """Set progress fields (rows_written, cursor, hooks' stats, complete) in one atomic write."""
        self._update(self.meta.progressed(**progress))

    def _update(self, meta: StoreMeta) -> None:
        # One write of zarr.json for all values: `group.attrs.update` would write it once per key,
        # and a kill between those writes could claim rows with a stale cursor.
        self.group = self.group.update_attributes(meta.to_attrs())
        self.meta = meta
