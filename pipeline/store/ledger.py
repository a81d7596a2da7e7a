"""Who wrote which shard: the claims a harvest makes as shards complete, for one process or many.

One process (`StoreClaims`) claims shards straight into the store's attributes, in shard order, so
a killed harvest leaves `rows_written` valid rows and resumes from the store's cursor.

Under torchrun (`RankLedger`), process r of W fills shards r, r + W, ... and records each in its own
group `progress/rank-r-of-W` (one zarr.json per process, so processes never write the same file);
rank 0 merges the records into rows_written, statistics and `complete` once every process is done.

Both answer the same questions for the one shard loop of gsp harvest: which shards are done, where
the corpus reader starts, how to claim a shard, and how to finish.
"""

import dataclasses
import math

import numpy as np
import zarr

from pipeline.corpus import Cursor
from pipeline.errors import GspError
from pipeline.store.meta import RowSums, Stats
from pipeline.store.writer import StoreWriter


class StoreClaims:
    """One process: shards are claimed in order in the store itself."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer
        self.ended: int | None = None  # shards the store keeps when the corpus ran out

    def done(self) -> set[int]:
        return set(range(self.writer.meta.rows_written // self.writer.meta.shard_rows))

    def start(self) -> tuple[Cursor, int]:
        """(corpus position, context number) where this process's reader starts: after the last claim."""
        return self.writer.meta.cursor, self.writer.meta.rows_written // self.writer.meta.context_size

    def commit(self, shard: int, rows: int, cursor: Cursor, sums: dict[str, RowSums]) -> None:
        self.writer.commit(shard, rows, cursor, sums)

    def end(self, shards: int) -> None:
        self.ended = shards

    def total_rows(self) -> int:
        """Rows claimed in all (the store is complete with these)."""
        return self.writer.meta.rows_written

    def finish(self) -> int:
        """Mark the store complete with what was claimed; returns its rows."""
        rows = self.writer.meta.rows_written
        self.writer.finish(rows)
        return rows


class RankLedger:
    """Process `rank` of `world`: shards claimed in its own progress record, merged by rank 0 at the end."""

    def __init__(self, writer: StoreWriter, rank: int, world: int):
        self.writer, self.rank, self.world = writer, rank, world

    def _group(self, rank: int) -> zarr.Group:
        return zarr.open_group(store=self.writer.group.store, path=f"progress/rank-{rank}-of-{self.world}", mode="a")

    def record(self, rank: int | None = None) -> dict:
        """{"shards": {shard: rows}, "stats": {hook: statistics}, "cursor", maybe "ended"} of a process."""
        attrs = dict(self._group(self.rank if rank is None else rank).attrs)
        empty = {h.name: Stats.empty(h.d_in).to_json() for h in self.writer.meta.hooks}
        if "count" in attrs.get("stats", {}):  # a format-1 store's record: one hook point's statistics
            attrs["stats"] = {self.writer.meta.hooks[0].name: attrs["stats"]}
        return attrs or {"shards": {}, "stats": empty, "cursor": {"doc": 0, "offset": 0}}

    def done(self) -> set[int]:
        return {int(s) for s in self.record()["shards"]}

    def start(self) -> tuple[Cursor, int]:
        """Every process reads the corpus from its start: the packing of shard s depends on every
        document before it, and the tokenizing is shared among the processes."""
        return Cursor(), 0

    def commit(self, shard: int, rows: int, cursor: Cursor, sums: dict[str, RowSums]) -> None:
        """Claim shard `shard` for this process: its record gains the shard, statistics and cursor at once."""
        record = self.record()
        record["shards"][str(shard)] = rows
        record["stats"] = {name: Stats.from_json(s).add(sums[name]).to_json() for name, s in record["stats"].items()}
        record["cursor"] = {"doc": cursor.doc, "offset": cursor.offset}
        self._group(self.rank).update_attributes(record)

    def end(self, shards: int) -> None:
        """Record that the corpus ran out: the store has only its first `shards` shards (the last maybe partial)."""
        record = self.record()
        record["ended"] = shards
        self._group(self.rank).update_attributes(record)

    def total_rows(self, records: list[dict] | None = None) -> int:
        """Rank 0, after every process is done: the rows the processes' records claim together."""
        records = records or [self.record(r) for r in range(self.world)]
        done = {int(k): v for rec in records for k, v in rec["shards"].items()}
        planned = math.ceil(self.writer.n_rows / self.writer.meta.shard_rows)
        n_shards = min([planned] + [r["ended"] for r in records if "ended" in r])
        rows = 0
        for shard in range(n_shards):
            if shard not in done:
                raise GspError(f"shard {shard} of store {self.writer.path} was never written; rerun the same command")
            rows += done[shard]
            if done[shard] < self.writer.meta.shard_rows:
                break  # the corpus ran out inside this shard
        return rows

    def finish(self) -> int:
        """Rank 0, after every process is done: merge the records, claim the rows, mark complete."""
        meta = self.writer.meta
        records = [self.record(r) for r in range(self.world)]
        done = {int(k) for rec in records for k in rec["shards"]}
        rows = self.total_rows(records)
        hooks = meta.hooks
        for rec in records:
            sums = {}
            for name, js in rec["stats"].items():
                s = Stats.from_json(js)
                sums[name] = RowSums(np.asarray(s.sum), s.sum_sq_norm, s.count)
            hooks = dataclasses.replace(meta, hooks=hooks).with_sums(sums)
        last = max(done) if done else 0
        c = records[last % self.world]["cursor"]
        self.writer.update(rows_written=rows, hooks=hooks, cursor=Cursor(c["doc"], c["offset"]))
        self.writer.finish(rows)
        return rows


def rank_claims(group: zarr.Group) -> int:
    """Shards claimed in the progress records of torchrun processes (0 where there are none)."""
    if "progress" not in group:
        return 0
    return sum(len(record.attrs.get("shards", {})) for _, record in group["progress"].groups())


def other_worlds(writer: StoreWriter, world: int) -> list[int]:
    """World sizes of earlier, unfinished multi-process harvests of this store other than `world`."""
    from zarr.core.sync import sync

    async def names():
        return [k async for k in writer.group.store.list_dir("progress")]

    found = {int(n.rsplit("-of-", 1)[1]) for n in sync(names()) if n.startswith("rank-")}
    return sorted(found - {world})
