"""The activation store: a self-describing Zarr v3 group that plain zarr can read.

Layout (documented in README.md, "The store format"):
    <store>/zarr.json            group attributes: everything needed to use and reproduce the store
    <store>/activations          (n_contexts × C, d_in), uint16 bfloat16 bit patterns or float32
    <store>/token_ids            (n_contexts × C,), int32
Row r is context r // C, position r % C; BOS/EOS/PAD rows are kept (readers mask them).

Both arrays are sharded: each shard file holds `shard_rows` rows as inner chunks of `chunk_rows`
rows, each chunk and the shard index carrying a crc32c checksum, so corruption is detected on read.

Crash safety: the store is written one whole shard at a time. zarr writes each file to a temporary
name and renames it, so a shard file is either complete or absent. Only after a shard's two files
are in place are the group attributes (rows_written, the corpus cursor and the running
statistics) rewritten, the same atomic way. A killed harvest therefore leaves a store whose
`rows_written` rows are all valid, and resuming rewrites only what came after.
"""

import asyncio
import datetime
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.errors import GroupNotFoundError

from pipeline import __version__
from pipeline.errors import GspError
from pipeline.faults import fault

FORMAT = "gsp-activation-store"
FORMAT_VERSION = 1
STORED_DTYPES = ("bfloat16", "float32")


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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def is_url(path: str | Path) -> bool:
    """A store on an fsspec filesystem (s3://, gs://, memory://, ...); file:// URLs are local paths."""
    return "://" in str(path) and not str(path).startswith("file://")


def local(path: str | Path) -> str:
    """A local store path as a plain path (file:// stripped)."""
    return str(path).removeprefix("file://")


def path_state(path: str | Path) -> str:
    """What is at a store path: "missing", "empty" (an empty folder), "file", "zarr" or "other"."""
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(str(path))
        if not fs.exists(p):
            return "missing"
        if fs.isfile(p):
            return "file"
        return "zarr" if fs.exists(f"{p.rstrip('/')}/zarr.json") else ("other" if fs.ls(p) else "empty")
    p = Path(local(path))
    if not p.exists():
        return "missing"
    if not p.is_dir():
        return "file"
    return "zarr" if (p / "zarr.json").is_file() else ("other" if any(p.iterdir()) else "empty")


def _open_group(path: str | Path, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path) if is_url(path) else local(path), mode=mode, zarr_format=3)
    except (FileNotFoundError, GroupNotFoundError):
        raise GspError(f"no store at {path}: check the path, or write one with `gsp harvest --store {path}`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise GspError(
            f"{path} is not a readable Zarr v3 group ({type(e).__name__}: {e}); was it copied whole?"
        ) from None


class ActivationStore:
    """A store opened for reading (and, for harvest, for committing shards)."""

    def __init__(self, group: zarr.Group, path: str):
        self.group, self.path = group, path
        self.attrs = dict(group.attrs)
        self.activations = group["activations"]
        self.token_ids = group["token_ids"]

    # ---------------------------------------------------------------- creating and opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        n_contexts: int,
        d_in: int,
        layout: Layout,
        dtype: str,
        attrs: dict,
    ) -> "ActivationStore":
        """A new, empty store (replacing whatever is at `path`) planned for `n_contexts` contexts."""
        if dtype not in STORED_DTYPES:
            raise GspError(f"store dtype '{dtype}' is not supported: use one of {', '.join(STORED_DTYPES)}")
        n_rows = n_contexts * layout.context_size
        group = zarr.open_group(str(path) if is_url(path) else local(path), mode="w", zarr_format=3)
        storage = "uint16" if dtype == "bfloat16" else "float32"
        group.create_array(
            "activations",
            shape=(n_rows, d_in),
            chunks=(layout.chunk_rows, d_in),
            shards=(layout.shard_rows, d_in),
            dtype=storage,
            compressors=[Crc32cCodec()],
            fill_value=0,
            attributes={"dtype": dtype, "note": "bfloat16 bit patterns" if dtype == "bfloat16" else ""},
        )
        group.create_array(
            "token_ids",
            shape=(n_rows,),
            chunks=(layout.chunk_rows,),
            shards=(layout.shard_rows,),
            dtype="int32",
            compressors=[Crc32cCodec()],
            fill_value=-1,
        )
        group.update_attributes(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "gsp_version": __version__,
                **attrs,
                "d_in": d_in,
                "context_size": layout.context_size,
                "dtype": dtype,
                "storage": "uint16 holding bfloat16 bit patterns" if dtype == "bfloat16" else "float32",
                "n_contexts_planned": n_contexts,
                "chunk_rows": layout.chunk_rows,
                "shard_rows": layout.shard_rows,
                "rows_written": 0,
                "complete": False,
                "cursor": {"doc": 0, "offset": 0},
                "stats": empty_stats(d_in),
                "created_at": _now(),
                "updated_at": _now(),
            }
        )
        return cls(group, str(path))

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "r") -> "ActivationStore":
        """Open and validate a store; every problem is a GspError naming the store."""
        group = _open_group(path, mode)
        attrs = group.attrs
        if attrs.get("format") != FORMAT:
            raise GspError(f"{path} is a Zarr group but not a gsp activation store (no format='{FORMAT}')")
        if attrs.get("format_version", 0) > FORMAT_VERSION:
            raise GspError(f"{path} was written by a newer gsp (format {attrs['format_version']}); upgrade gsp")
        for name in ("activations", "token_ids"):
            if name not in group:
                raise GspError(f"store {path} has no '{name}' array; it is damaged, harvest it again")
        store = cls(group, str(path))
        store._check_shards_present()
        return store

    def _check_shards_present(self) -> None:
        """Every shard that rows_written claims must exist (a missing file would read as zeros)."""
        from zarr.core.sync import sync

        for name in ("activations", "token_ids"):
            suffix = "/0" if name == "activations" else ""
            for shard in range(math.ceil(self.rows_written / self.shard_rows)):
                key = f"{name}/c/{shard}{suffix}"
                if not sync(self.group.store.exists(key)):
                    raise GspError(
                        f"store {self.path} is missing the shard file {key} (rows {self.shard_span(shard)}); "
                        "it is damaged: harvest it again with --overwrite"
                    )

    # ---------------------------------------------------------------- what it holds
    @property
    def rows_written(self) -> int:
        return int(self.attrs["rows_written"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    @property
    def d_in(self) -> int:
        return int(self.attrs["d_in"])

    @property
    def context_size(self) -> int:
        return int(self.attrs["context_size"])

    @property
    def shard_rows(self) -> int:
        return int(self.attrs["shard_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def special_ids(self) -> list[int]:
        tok = self.attrs.get("tokenizer", {})
        return sorted({tok[k] for k in ("bos_id", "eos_id", "pad_id") if tok.get(k) is not None})

    def rerun_model(self, model: str | None, revision: str | None) -> tuple[str, str | None]:
        """(spec, revision) of the model to run on this store's tokens: `model` when given, else the
        one the store was harvested from at its recorded revision (local folders ignore it)."""
        if model:
            return model, revision
        return self.attrs["model"]["spec"], revision or self.attrs["model"]["revision"]

    def shard_span(self, shard: int) -> str:
        return f"{shard * self.shard_rows}..{min((shard + 1) * self.shard_rows, self.activations.shape[0]) - 1}"

    # ---------------------------------------------------------------- reading
    def read(self, start: int, stop: int) -> np.ndarray:
        """Activations of rows [start, stop) as float32 (B, D)."""
        raw = self._read(self.activations, start, stop)
        return bf16_bits_to_f32(raw) if self.attrs["dtype"] == "bfloat16" else raw

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        return self._read(self.token_ids, start, stop)

    def _read(self, array: zarr.Array, start: int, stop: int) -> np.ndarray:
        try:
            return array[start:stop]
        except ValueError as e:
            if "checksum" not in str(e):
                raise
            first, last = start // self.shard_rows, (stop - 1) // self.shard_rows
            files = ", ".join(f"{array.name.strip('/')}/c/{s}" for s in range(first, last + 1))
            raise GspError(
                f"corrupt data in store {self.path}: rows {start}..{stop - 1} failed their crc32c checksum "
                f"(shard file {files}); restore the file or harvest again with --overwrite"
            ) from None

    def ordinary_rows(self, limit: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches (x (B, D) float32, row indices (B,)) of the first `limit` rows that hold no special
        token, read shard-chunk by chunk in store order."""
        special = np.array(self.special_ids, dtype=np.int64)
        seen, span = 0, max(batch, self.chunk_rows)
        for start in range(0, self.rows_written, span):
            stop = min(start + span, self.rows_written)
            keep = np.flatnonzero(~np.isin(self.read_tokens(start, stop), special))[: limit - seen]
            x = self.read(start, stop)
            for part in np.array_split(keep, max(1, -(-len(keep) // batch))):
                if len(part):
                    yield x[part], start + part
            seen += len(keep)
            if seen >= limit:
                return

    # ---------------------------------------------------------------- writing (harvest only)
    def write_shard_data(self, shard: int, acts: np.ndarray, tokens: np.ndarray) -> None:
        """Write one whole shard's two files (in any order; nothing is claimed until `commit`)."""
        rows = slice(shard * self.shard_rows, shard * self.shard_rows + len(tokens))

        async def both():
            await asyncio.gather(
                self.activations.async_array.setitem(rows, acts), self.token_ids.async_array.setitem(rows, tokens)
            )

        if is_url(self.path):  # remote filesystems' clients live on zarr's own event loop
            self.activations[rows] = acts
            self.token_ids[rows] = tokens
        else:
            # An event loop per call, rather than zarr's one shared loop: checksumming and assembling
            # shards then runs on as many writer threads as the caller uses, not on one thread.
            asyncio.run(both())
        fault("shard-data-written")

    def commit(self, shard: int, rows: int, cursor: dict, sums: "RowSums") -> None:
        """Claim shard `shard` (`rows` rows, already written): rows_written, cursor and statistics at once."""
        start = shard * self.shard_rows
        if start != self.rows_written:
            raise RuntimeError(f"shard {shard} starts at row {start}, but {self.rows_written} rows are written")
        stats = merge_stats(self.attrs["stats"], sums)
        self._update({"rows_written": start + rows, "cursor": cursor, "stats": stats})

    def write_shard(self, shard: int, acts: np.ndarray, tokens: np.ndarray, cursor: dict, sums: "RowSums") -> None:
        self.write_shard_data(shard, acts, tokens)
        self.commit(shard, len(tokens), cursor, sums)

    def finish(self, rows: int) -> None:
        """Mark the store complete; if the corpus ran out early, shrink the arrays to what was written."""
        if rows < self.activations.shape[0]:
            self.activations.resize((rows, self.d_in))
            self.token_ids.resize((rows,))
        self._update({"complete": True})

    # ---------------------------------------------------------------- multi-process harvests (torchrun)
    # Process r of W fills shards r, r + W, ... and records them in its own group progress/rank-r-of-W
    # (one zarr.json per process, so processes never write the same file); rank 0 merges the records
    # into rows_written, statistics and `complete` once every process is done.
    def rank_group(self, rank: int, world: int) -> zarr.Group:
        return zarr.open_group(store=self.group.store, path=f"progress/rank-{rank}-of-{world}", mode="a")

    def rank_record(self, rank: int, world: int) -> dict:
        attrs = dict(self.rank_group(rank, world).attrs)
        return attrs or {"shards": {}, "stats": empty_stats(self.d_in), "cursor": {"doc": 0, "offset": 0}}

    def other_worlds(self, world: int) -> list[int]:
        """World sizes of earlier, unfinished multi-process harvests other than `world`."""
        from zarr.core.sync import sync

        async def names():
            return [k async for k in self.group.store.list_dir("progress")]

        found = {int(n.rsplit("-of-", 1)[1]) for n in sync(names()) if n.startswith("rank-")}
        return sorted(found - {world})

    def commit_rank(self, rank: int, world: int, shard: int, rows: int, cursor: dict, sums: "RowSums") -> None:
        """Claim shard `shard` for process `rank`: its record gains the shard, statistics and cursor at once."""
        record = self.rank_record(rank, world)
        record["shards"][str(shard)] = rows
        record["stats"] = merge_stats(record["stats"], sums)
        record["cursor"] = cursor
        self.rank_group(rank, world).update_attributes(record)

    def end_rank(self, rank: int, world: int, shards: int) -> None:
        """Record that the corpus ran out: the store has only its first `shards` shards (the last maybe partial)."""
        record = self.rank_record(rank, world)
        record["ended"] = shards
        self.rank_group(rank, world).update_attributes(record)

    def finish_ranks(self, world: int) -> int:
        """Rank 0, after every process is done: merge the records, claim the rows, mark complete."""
        records = [self.rank_record(r, world) for r in range(world)]
        done = {int(k): v for rec in records for k, v in rec["shards"].items()}
        n_shards = min(
            [math.ceil(self.activations.shape[0] / self.shard_rows)] + [r["ended"] for r in records if "ended" in r]
        )
        rows = 0
        for shard in range(n_shards):
            if shard not in done:
                raise GspError(f"shard {shard} of store {self.path} was never written; rerun the same command")
            rows += done[shard]
            if done[shard] < self.shard_rows:
                break  # the corpus ran out inside this shard
        stats = self.attrs["stats"]
        for rec in records:
            s = rec["stats"]
            stats = merge_stats(stats, RowSums(np.asarray(s["sum"]), s["sum_sq_norm"], s["count"]))
        last = max(done) if done else 0
        cursor = records[last % world]["cursor"]
        self._update({"rows_written": rows, "stats": stats, "cursor": cursor})
        self.finish(rows)
        return rows

    def _update(self, values: dict) -> None:
        # One write of zarr.json for all values: `group.attrs.update` would write it once per key,
        # and a kill between those writes could claim rows with a stale cursor.
        values = {**values, "updated_at": _now()}
        self.group = self.group.update_attributes(values)
        self.attrs.update(values)


# -------------------------------------------------------------------- running statistics
@dataclass
class RowSums:
    """Float64 sums over some non-special rows: Σx (D,), Σ‖x‖², and how many rows."""

    sum: np.ndarray
    sum_sq_norm: float
    count: int


def empty_stats(d_in: int) -> dict:
    return {"count": 0, "sum": [0.0] * d_in, "sum_sq_norm": 0.0, "mean": [0.0] * d_in, "mean_sq_norm": 0.0}


def merge_stats(stats: dict, sums: RowSums) -> dict:
    """Running statistics after adding `sums` (in shard order, so a resumed store gets the same numbers)."""
    total = np.asarray(stats["sum"], dtype=np.float64) + sums.sum
    sq = float(stats["sum_sq_norm"]) + sums.sum_sq_norm
    count = int(stats["count"]) + sums.count
    return {
        "count": count,
        "sum": total.tolist(),
        "sum_sq_norm": sq,
        "mean": (total / max(count, 1)).tolist(),
        "mean_sq_norm": sq / max(count, 1),
    }
