"""Reading a store: `ActivationStore.open(path)` checks it, then serves rows as float32 and token ids.

Every read goes chunk by chunk through pipeline/store/shards.py and is checked: each chunk's crc32c,
and, in stores that record them (pipeline/store/checksums.py), that it is the chunk written at its
place; a failure names the one shard file that holds it. A chunk of written rows that its shard index
says was never written, a shard that the store claims but that is missing or empty, and token ids of
written rows that read as the fill value are errors too, so damage never reads as zeros. At open,
the arrays' data types must be the ones the attributes say.
"""

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.errors import GspError
from pipeline.store.checksums import TABLE, ChunkTable
from pipeline.store.location import is_url, local, open_group
from pipeline.store.meta import ARRAY_DTYPES, FORMAT, HookMeta, StoreMeta
from pipeline.store.shards import ChunkReader, Corrupt


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
    """The file (object key) of one shard of an array (`token_ids`, `activations`, `<hook>/activations`
    or the checksum table), relative to the store."""
    return f"{array}/c/{shard}/0" if array.endswith(("activations", TABLE)) else f"{array}/c/{shard}"


def open_array(group: zarr.Group, name: str, path: str) -> zarr.Array:
    try:
        return group[name]
    except KeyError:
        raise GspError(f"store {path} has no '{name}' array; it is damaged, harvest it again") from None
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise GspError(f"store {path}: {name}/zarr.json is damaged ({type(e).__name__}); harvest it again "
                       "with --overwrite") from None  # fmt: skip


class ActivationStore:
    """One hook point of a store, opened for reading: `meta` is the store's typed attributes, `hook`
    the hook point's (layer, site, d_in, statistics); rows are read as float32."""

    def __init__(self, group: zarr.Group, path: str, meta: StoreMeta, hook: HookMeta, root: str | None = None):
        self.group, self.path, self.meta, self.hook = group, path, meta, hook
        self.root = root or path  # the store's own path (for one hook point of several, the parent)
        self.array_name = meta.array_path(hook)
        self.activations = open_array(group, self.array_name, path)
        self.token_ids = open_array(group, "token_ids", path)
        if self.activations.shape[1:] != (hook.d_in,) or self.activations.shape[0] != self.token_ids.shape[0]:
            raise GspError(f"store {path}: its arrays' shapes {self.activations.shape}, {self.token_ids.shape} "
                           f"do not match its attributes (d_in {hook.d_in}); it is damaged")  # fmt: skip
        self._check_dtypes()
        per_shard = meta.shard_rows // meta.chunk_rows
        self.table = ChunkTable(open_array(group, TABLE, path), per_shard, path) if meta.chunk_crc32c else None
        self._chunk_readers: dict[str, ChunkReader] = {}

    def _check_dtypes(self) -> None:
        """The arrays hold the data types the attributes say: a float32 array read as bfloat16 bit
        patterns (or the reverse) would be garbage, and `gsp info` would show the wrong dtype."""
        dtype, held = self.meta.dtype, str(self.activations.dtype)
        said = self.activations.attrs.get("dtype", dtype)  # the array's own attributes repeat it
        if held != ARRAY_DTYPES[dtype] or said != dtype:
            really = {v: k for k, v in ARRAY_DTYPES.items()}.get(held, held)
            raise GspError(
                f"store {self.path}: {self.array_name} holds {really} values ({held}), but the store's attributes "
                f"say dtype {dtype}{f' and the array its own say {said}' if said != dtype else ''}; the store is "
                "damaged: harvest it again with --overwrite"
            )
        if str(self.token_ids.dtype) != "int32":
            raise GspError(f"store {self.path}: token_ids holds {self.token_ids.dtype}, not int32; the store is "
                           "damaged: harvest it again with --overwrite")  # fmt: skip

    @classmethod
    def open(cls, path) -> "ActivationStore":
        """Open and check one hook point: `STORE` when it holds one, else `STORE/L12.resid_post`.
        Every problem is a GspError naming the store."""
        path = str(path)
        root, name = _root_and_hook(path)
        group = open_group(root, "r")
        meta = StoreMeta.from_attrs(dict(group.attrs), root)
        names = [h.name for h in meta.hooks]
        if name is None and len(names) > 1:
            raise GspError(f"store {root} holds {len(names)} hook points ({', '.join(names)}); name one, "
                           f"e.g. {root.rstrip('/')}/{names[0]}")  # fmt: skip
        if name is not None and name not in names:
            raise GspError(f"store {root} has no hook point {name}; it holds {', '.join(names)}")
        store = cls(group, path, meta, meta.hook(name or names[0]), root)
        store.check_shards()
        return store

    @classmethod
    def open_some(cls, path) -> list["ActivationStore"]:
        """The hook point `path` names (`STORE/L12.resid_post`), or every hook point of the store `path`."""
        root, name = _root_and_hook(str(path))
        return [cls.open(path)] if name is not None else cls.open_all(root)

    @classmethod
    def open_all(cls, path) -> list["ActivationStore"]:
        """Every hook point of the store at `path` (its root)."""
        group = open_group(path, "r")
        meta = StoreMeta.from_attrs(dict(group.attrs), str(path))
        base = str(path).rstrip("/")
        stores = [cls(group, base if len(meta.hooks) == 1 else f"{base}/{h.name}", meta, h, str(path))
                  for h in meta.hooks]  # fmt: skip
        stores[0].check_shards(all_hooks=True)
        return stores

    def check_shards(self, all_hooks: bool = False) -> None:
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
        hooks = self.meta.hooks if all_hooks else (self.hook,)
        prefix = f"{self.group.path}/" if self.group.path else ""
        tables = [TABLE] if self.table is not None else []
        for name in ["token_ids", *tables, *(self.meta.array_path(h) for h in hooks)]:
            keys = [prefix + shard_key(name, s) for s in range(n)]
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
        return self.hook.d_in

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
        raw = self._read_rows(start, stop, tokens=False)
        return bf16_bits_to_f32(raw) if self.meta.dtype == "bfloat16" else raw

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids of rows [start, stop) (int32)."""
        return self._read_rows(start, stop, tokens=True)

    @property
    def stored_dtype(self) -> np.dtype:
        """The activations' dtype on disk: uint16 (bfloat16 bit patterns) or float32."""
        return np.dtype(self.activations.dtype)

    def read_chunk(self, chunk: int, out: np.ndarray, *, tokens: bool = False) -> int:
        """Chunk `chunk`'s activations in the stored dtype (or, with `tokens`, its token ids) into `out`,
        a C-contiguous (chunk_rows, d_in) (or (chunk_rows,)) buffer, straight from the shard file where
        the store is local; returns how many of its rows are written. Rows the store claims are checked:
        the chunk's crc32c, that it was written, that it is the chunk written at this place, and (with
        `tokens`) that no token id is the fill value. Every problem is a GspError naming the shard file."""
        name = "token_ids" if tokens else self.array_name
        start = chunk * self.chunk_rows
        written = max(min(start + self.chunk_rows, self.rows_written) - start, 0)
        file, where = self._file(name, chunk), f"rows {start}..{start + max(written, 1) - 1}"
        try:
            crc = self._chunk_reader(name).read(chunk, out)
        except Corrupt as e:
            raise self._corrupt(where, f"failed their crc32c checksum ({e}; shard file {file})") from None
        except FileNotFoundError:
            if written:
                raise GspError(f"store {self.path}: the shard file {file} is gone; restore it or harvest again "
                               "with --overwrite") from None  # fmt: skip
            out[...] = (self.token_ids if tokens else self.activations).metadata.fill_value  # as zarr reads it
            return 0
        if not written:  # rows past the claimed ones: unwritten, or written but not claimed yet
            return 0
        if crc is None:
            raise self._corrupt(where, f"were never written (the index of shard file {file} lacks their chunk), "
                                "though the store claims them")  # fmt: skip
        if self.table is not None and crc != self.table.expected(chunk, "token_ids" if tokens else self.hook.name):
            raise self._corrupt(where, f"are not the rows written there (shard file {file} holds an intact chunk "
                                "of other data: was it moved, or swapped with another?)")  # fmt: skip
        if tokens:
            self._check_written(out[:written], start, start + written)
        return written

    @property
    def _per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    def _chunk_reader(self, name: str) -> ChunkReader:
        reader = self._chunk_readers.get(name)
        if reader is None:
            folder = None if is_url(self.root) else Path(local(self.root)) / name
            array = self.token_ids if name == "token_ids" else self.activations
            reader = self._chunk_readers[name] = ChunkReader(array, folder)
        return reader

    def _read_rows(self, start: int, stop: int, *, tokens: bool) -> np.ndarray:
        """Rows [start, stop) in the stored dtype, read and checked chunk by chunk (read_chunk)."""
        stop = min(stop, self.n_rows)
        row_shape, dtype = ((), np.dtype(np.int32)) if tokens else ((self.d_in,), self.stored_dtype)
        out = np.empty((max(stop - start, 0), *row_shape), dtype)
        buffer = None
        for chunk in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            first, end = chunk * self.chunk_rows, (chunk + 1) * self.chunk_rows
            if start <= first and end <= stop:  # a whole chunk: read in place
                self.read_chunk(chunk, out[first - start : end - start], tokens=tokens)
                continue
            if buffer is None:
                buffer = np.empty((self.chunk_rows, *row_shape), dtype)
            self.read_chunk(chunk, buffer, tokens=tokens)
            lo, hi = max(start, first), min(stop, end)
            out[lo - start : hi - start] = buffer[lo - first : hi - first]
        return out

    def _check_written(self, ids: np.ndarray, start: int, stop: int) -> None:
        """Token ids of written rows are never the fill value −1: if they are, their shard is damaged."""
        if len(ids) and ids.min() < 0:
            file = self._file("token_ids", start // self.chunk_rows)
            raise self._corrupt(f"rows {start}..{stop - 1}", f"hold no token ids (shard {file} reads as unwritten)")

    def _corrupt(self, rows: str, what: str) -> GspError:
        return GspError(f"corrupt data in store {self.path}: {rows} {what}; restore the file or harvest again "
                        "with --overwrite")  # fmt: skip

    def _file(self, name: str, chunk: int) -> str:
        """The shard file that holds chunk `chunk` of array `name`."""
        return shard_key(name, chunk // self._per_shard)

    def ordinary_rows(
        self, limit: int, batch: int, share: tuple[int, int] = (0, 1), target: "ActivationStore | None" = None
    ) -> Iterator[tuple]:
        """Batches (x (B, D) float32, row indices (B,)) of the first `limit` rows that hold no special
        token, read span by span in store order; with `target` (another hook point of the same rows,
        a transcoder's), (x, y (B, O), row indices).

        With `share=(rank, world)` this process reads and serves only spans rank, rank + world, ...:
        every process reads the (small) token ids to know which rows count, and only its own
        share of the activations; together the processes serve each row once.
        """
        stores = [self] if target is None else [self, target]
        for arrays, rows in ordinary_rows_of(stores, limit, batch, share):
            yield (*arrays, rows)

    def verify(self, advance=lambda n: None) -> None:
        """Read every written row back (checksums, token ids); `advance(rows)` after each shard."""
        for start in range(0, self.rows_written, self.shard_rows):
            stop = min(start + self.shard_rows, self.rows_written)
            self.read(start, stop)
            self.read_tokens(start, stop)
            advance(stop - start)


def ordinary_rows_of(
    stores: list[ActivationStore], limit: int, batch: int, share: tuple[int, int] = (0, 1)
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """([x (B, D_i) of each store], row indices (B,)) for hook points of the same rows (the first
    store's token ids decide which rows count); see ActivationStore.ordinary_rows."""
    first, (rank, world) = stores[0], share
    special = np.array(first.special_ids, dtype=np.int64)
    seen, span = 0, max(batch, first.chunk_rows)
    for index, start in enumerate(range(0, first.rows_written, span)):
        stop = min(start + span, first.rows_written)
        keep = np.flatnonzero(~np.isin(first.read_tokens(start, stop), special))[: limit - seen]
        if index % world == rank and len(keep):
            arrays = [s.read(start, stop) for s in stores]
            for piece in np.array_split(keep, max(1, -(-len(keep) // batch))):
                if len(piece):
                    yield [a[piece] for a in arrays], start + piece
        seen += len(keep)
        if seen >= limit:
            return


def _root_and_hook(path: str) -> tuple[str, str | None]:
    """(the store's root, the hook point named by the path's last part, or None for the root itself).

    `STORE/L12.resid_post` names a hook point when STORE is a store and the last part is not."""
    from pipeline.store.location import path_state

    base = path.rstrip("/")
    if "/" in base and path_state(base) != "zarr":
        parent, last = base.rsplit("/", 1)
        if path_state(parent) == "zarr":
            return parent, last
    if "/" in base and path_state(base) == "zarr":
        parent, last = base.rsplit("/", 1)
        if path_state(parent) == "zarr" and _is_store(parent):
            return parent, last  # a hook point's own group (format 2): its parent is the store
    return path, None


def _is_store(path: str) -> bool:
    try:
        return open_group(path, "r").attrs.get("format") == FORMAT
    except GspError:
        return False


def same_rows(a: ActivationStore, b: ActivationStore) -> None:
    """Two hook points must hold the same rows (a transcoder's input and target): hook points of one
    store do; two stores do when one harvest's settings wrote both. Else one error naming the difference."""
    if a.root == b.root:
        return
    ma, mb = a.meta, b.meta
    where = ("layer", "site")  # what may differ: where the activations were taken
    checks = {
        "model": ((ma.model.name, ma.model.revision), (mb.model.name, mb.model.revision)),
        "corpus": (ma.dataset, mb.dataset),
        "context size": (ma.context_size, mb.context_size),
        "harvest settings": tuple({k: v for k, v in m.spec.items() if k not in where} for m in (ma, mb)),
        "rows written": (ma.rows_written, mb.rows_written),
        "chunk rows": (ma.chunk_rows, mb.chunk_rows),
    }
    for what, (x, y) in checks.items():
        if x != y:
            raise GspError(
                f"stores {a.path} and {b.path} do not hold the same rows: their {what} differ "
                f"({x!r} vs {y!r}); harvest both hook points in one run (--site mlp_in,mlp_out)"
            )
    if a.rows_written and not np.array_equal(a.read_tokens(0, a.chunk_rows), b.read_tokens(0, b.chunk_rows)):
        raise GspError(f"stores {a.path} and {b.path} do not hold the same rows: their token ids differ")
