"""A store's attributes as one typed record: `StoreMeta`, written and read only through to/from_attrs.

The attributes (the group's `zarr.json`) say everything needed to use and to reproduce a store; the
keys are documented in docs/store-format.md. Code reads fields of `StoreMeta`, never string keys,
and a store with a missing or malformed attribute is one GspError naming the key.
"""

import dataclasses
import datetime
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.corpus import Cursor
from pipeline.errors import GspError

FORMAT = "gsp-activation-store"
FORMAT_VERSION = 2  # 1: one hook point, arrays at the root; 2: hook points in their own groups
STORED_DTYPES = ("bfloat16", "float32")
STORAGE = {"bfloat16": "uint16 holding bfloat16 bit patterns", "float32": "float32"}
ARRAY_DTYPES = {"bfloat16": "uint16", "float32": "float32"}  # the activations arrays' own data type


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class _Bad(Exception):
    """A malformed attribute: (key, what was expected)."""


def _get(d: dict, key: str, kind: type | tuple, *, optional: bool = False, prefix: str = "") -> Any:
    if not isinstance(d, dict) or key not in d:
        if optional:
            return None
        raise _Bad(prefix + key, "is missing")
    value = d[key]
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if not ok:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(prefix + key, f"should be {want}, not {value!r}"[:120])
    return value


def _numbers(d: dict, key: str, *, optional: bool = False, prefix: str = "") -> tuple[float, ...] | None:
    """A list of numbers (not booleans) as floats; None for an optional key that is absent."""
    values = _get(d, key, list, optional=optional, prefix=prefix)
    if values is None:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise _Bad(prefix + key, "should be a list of numbers")
    return tuple(float(v) for v in values)


# ------------------------------------------------------------------------------ running statistics
@dataclass(frozen=True)
class RowSums:
    """Float64 sums over some non-special rows: Σx (D,), Σ‖x‖², and how many rows."""

    sum: np.ndarray
    sum_sq_norm: float
    count: int


@dataclass(frozen=True)
class Stats:
    """Statistics of a store's non-special rows, merged shard by shard in shard order (float64)."""

    count: int
    sum: tuple[float, ...]
    sum_sq_norm: float

    @staticmethod
    def empty(d_in: int) -> "Stats":
        return Stats(0, (0.0,) * d_in, 0.0)

    @property
    def mean(self) -> list[float]:
        return (np.asarray(self.sum, dtype=np.float64) / max(self.count, 1)).tolist()

    @property
    def mean_sq_norm(self) -> float:
        """E‖x‖² over the non-special rows: fit scales inputs by 1/√ of this."""
        return self.sum_sq_norm / max(self.count, 1)

    def add(self, sums: RowSums) -> "Stats":
        total = np.asarray(self.sum, dtype=np.float64) + sums.sum
        return Stats(self.count + sums.count, tuple(total.tolist()), self.sum_sq_norm + sums.sum_sq_norm)

    def to_json(self) -> dict:
        return {"count": self.count, "sum": list(self.sum), "sum_sq_norm": self.sum_sq_norm, "mean": self.mean,
                "mean_sq_norm": self.mean_sq_norm}  # fmt: skip

    @staticmethod
    def from_json(d: dict, prefix: str = "stats.") -> "Stats":
        count = _get(d, "count", int, prefix=prefix)
        total = _numbers(d, "sum", prefix=prefix)
        return Stats(count, total, float(_get(d, "sum_sq_norm", (int, float), prefix=prefix)))


# ------------------------------------------------------------------------------ what made the store
@dataclass(frozen=True)
class ModelRef:
    spec: str  # what was passed to --model; loading it again gives the same model
    name: str  # the Hub name (e.g. google/gemma-3-270m), which pretrained SAEs name
    revision: str  # Hub commit, package version, or "local"
    cls: str  # the transformers class

    def to_json(self) -> dict:
        return {"spec": self.spec, "name": self.name, "revision": self.revision, "class": self.cls}

    @staticmethod
    def from_json(d: dict) -> "ModelRef":
        g = lambda k: _get(d, k, str, prefix="model.")  # noqa: E731
        return ModelRef(g("spec"), g("name"), g("revision"), g("class"))


@dataclass(frozen=True)
class TokenizerRef:
    name: str
    cls: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    def special_ids(self) -> list[int]:
        """BOS, EOS and PAD: the rows no SAE trains or is measured on."""
        return sorted({i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None})

    def to_json(self) -> dict:
        return {"name": self.name, "class": self.cls, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}  # fmt: skip

    @staticmethod
    def from_json(d: dict) -> "TokenizerRef":
        p = "tokenizer."
        ids = [_get(d, k, int, optional=True, prefix=p) for k in ("bos_id", "eos_id", "pad_id")]
        return TokenizerRef(_get(d, "name", str, prefix=p), _get(d, "class", str, prefix=p),
                            _get(d, "vocab_size", int, prefix=p), *ids)  # fmt: skip


@dataclass(frozen=True)
class CorpusRef:
    """Which documents, in which order: the harvest's corpus options."""

    dataset: str
    split: str
    dataset_config: str | None
    text_column: str
    part: str
    heldout_fraction: float
    seed: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "CorpusRef":
        p = "dataset."
        return CorpusRef(
            _get(d, "dataset", str, prefix=p), _get(d, "split", str, prefix=p),
            _get(d, "dataset_config", str, optional=True, prefix=p), _get(d, "text_column", str, prefix=p),
            _get(d, "part", str, prefix=p), float(_get(d, "heldout_fraction", (int, float), prefix=p)),
            _get(d, "seed", int, prefix=p),
        )  # fmt: skip


@dataclass(frozen=True)
class Compute:
    device: str  # "cpu" or "cuda"
    dtype: str  # of the forward pass

    def to_json(self) -> dict:
        return {"device": self.device, "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> "Compute":
        return Compute(_get(d, "device", str, prefix="compute."), _get(d, "dtype", str, prefix="compute."))


# ------------------------------------------------------------------------------ the record
@dataclass(frozen=True)
class HookMeta:
    """One hook point of a store: its activations are the array `<name>/activations` (format 2) or
    `activations` at the store's root (format 1, one hook point)."""

    name: str  # e.g. L12.resid_post
    layer: int
    site: str
    hook_point: str  # e.g. model.layers.12.output (Gemma Scope 2's hf_hook_point_in)
    d_in: int
    stats: Stats | None = None  # statistics of its non-special rows; None: filled with Stats.empty(d_in)
    # per dimension, how strongly later layers read it (pipeline.hooks.read_gains); None for a site
    # outside the residual stream, or a store harvested before gsp recorded them
    read_gains: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.stats is None:
            object.__setattr__(self, "stats", Stats.empty(self.d_in))

    def to_json(self) -> dict:
        gains = {} if self.read_gains is None else {"read_gains": list(self.read_gains)}
        return {"name": self.name, "layer": self.layer, "site": self.site, "hook_point": self.hook_point,
                "d_in": self.d_in, "stats": self.stats.to_json(), **gains}  # fmt: skip

    @staticmethod
    def from_json(d: dict, prefix: str) -> "HookMeta":
        g = lambda k, kind: _get(d, k, kind, prefix=prefix)  # noqa: E731
        stats = Stats.from_json(g("stats", dict), prefix=prefix + "stats.")
        gains = _numbers(d, "read_gains", optional=True, prefix=prefix)
        return HookMeta(g("name", str), g("layer", int), g("site", str), g("hook_point", str), g("d_in", int), stats,
                        gains)  # fmt: skip


@dataclass(frozen=True)
class StoreMeta:
    """Everything a store's attributes hold. The first group of fields is fixed when the store is
    created; `rows_written`, `complete`, `cursor`, the hooks' `stats` and `updated_at` are its progress,
    rewritten together in one write, so every hook point has the same committed rows."""

    model: ModelRef
    hooks: tuple[HookMeta, ...]  # in forward order
    context_size: int
    dataset: CorpusRef
    tokenizer: TokenizerRef
    compute: Compute
    dtype: str  # bfloat16 | float32
    n_contexts_planned: int
    chunk_rows: int
    shard_rows: int
    spec: dict  # every harvest option that decides the content
    packing: str = "[BOS] + C-1 tokens of doc1 EOS doc2 EOS ..."
    chunk_crc32c: bool = True  # each chunk's crc32c recorded at its place (store/checksums.py); older stores: False
    rows_written: int = 0
    complete: bool = False
    cursor: Cursor = Cursor()
    created_at: str = ""
    updated_at: str = ""
    gsp_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def special_ids(self) -> list[int]:
        return self.tokenizer.special_ids

    @property
    def seed(self) -> int:
        return self.dataset.seed

    def hook(self, name: str) -> HookMeta:
        return next(h for h in self.hooks if h.name == name)

    def array_path(self, hook: HookMeta) -> str:
        """Where a hook point's activations are, relative to the store's root."""
        return "activations" if self.format_version == 1 else f"{hook.name}/activations"

    def progressed(self, **changes) -> "StoreMeta":
        """This record with progress fields changed and `updated_at` now."""
        return dataclasses.replace(self, **changes, updated_at=now())

    def with_sums(self, sums: dict[str, RowSums]) -> tuple[HookMeta, ...]:
        """The hooks with each one's statistics grown by its shard's sums."""
        return tuple(dataclasses.replace(h, stats=h.stats.add(sums[h.name])) for h in self.hooks)

    def to_attrs(self) -> dict:
        common = {
            "format": FORMAT,
            "format_version": self.format_version,
            "gsp_version": self.gsp_version,
            "spec": self.spec,
            "model": self.model.to_json(),
            "dataset": self.dataset.to_json(),
            "seed": self.seed,
            "tokenizer": self.tokenizer.to_json(),
            "compute": self.compute.to_json(),
            "packing": self.packing,
            "chunk_crc32c": self.chunk_crc32c,
            "context_size": self.context_size,
            "dtype": self.dtype,
            "storage": STORAGE[self.dtype],
            "n_contexts_planned": self.n_contexts_planned,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "rows_written": self.rows_written,
            "complete": self.complete,
            "cursor": {"doc": self.cursor.doc, "offset": self.cursor.offset},
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if self.format_version == 1:  # one hook point, its fields at the top level
            (h,) = self.hooks
            return {**common, **{k: v for k, v in h.to_json().items() if k != "name"}}
        return {**common, "hooks": [h.to_json() for h in self.hooks]}

    @staticmethod
    def from_attrs(a: dict, path: str) -> "StoreMeta":
        """The record, after checking the format; any missing or malformed key is a GspError."""
        if a.get("format") != FORMAT:
            raise GspError(f"{path} is a Zarr group but not a gsp activation store (no format='{FORMAT}')")
        try:
            version = _get(a, "format_version", int)
            if version > FORMAT_VERSION:
                raise GspError(f"{path} was written by a newer gsp (format {version}); upgrade gsp")
            cursor = _get(a, "cursor", dict)
            meta = StoreMeta(
                model=ModelRef.from_json(_get(a, "model", dict)),
                hooks=_hooks_from_attrs(a, version),
                context_size=_get(a, "context_size", int),
                dataset=CorpusRef.from_json(_get(a, "dataset", dict)),
                tokenizer=TokenizerRef.from_json(_get(a, "tokenizer", dict)),
                compute=Compute.from_json(_get(a, "compute", dict)),
                dtype=_get(a, "dtype", str),
                n_contexts_planned=_get(a, "n_contexts_planned", int),
                chunk_rows=_get(a, "chunk_rows", int),
                shard_rows=_get(a, "shard_rows", int),
                spec=_spec(_get(a, "spec", dict), version),
                packing=_get(a, "packing", str),
                chunk_crc32c=_get(a, "chunk_crc32c", bool, optional=True) or False,  # absent: written before it
                rows_written=_get(a, "rows_written", int),
                complete=_get(a, "complete", bool),
                cursor=Cursor(*(_get(cursor, k, int, prefix="cursor.") for k in ("doc", "offset"))),
                created_at=_get(a, "created_at", str),
                updated_at=_get(a, "updated_at", str),
                gsp_version=_get(a, "gsp_version", str),
                format_version=version,
            )
        except _Bad as e:
            key, why = e.args
            raise GspError(f"store {path} has a damaged attribute '{key}' ({why}) in its zarr.json; "
                           "harvest it again with --overwrite") from None  # fmt: skip
        meta._check(path)
        return meta

    def _check(self, path: str) -> None:
        """Values that parse but cannot be right."""
        problems = []
        if self.dtype not in STORED_DTYPES:
            problems.append(f"dtype '{self.dtype}' is not one of {', '.join(STORED_DTYPES)}")
        for name in ("context_size", "chunk_rows", "shard_rows"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} is {getattr(self, name)}")
        if self.shard_rows % max(self.chunk_rows, 1) or self.chunk_rows % max(self.context_size, 1):
            problems.append("chunks and shards are not whole contexts")
        if not 0 <= self.rows_written <= self.n_contexts_planned * self.context_size:
            problems.append(f"rows_written is {self.rows_written}")
        if not self.hooks or len({h.name for h in self.hooks}) != len(self.hooks):
            problems.append("its hook points are missing or repeated")
        for h in self.hooks:
            s = h.stats
            if h.d_in <= 0 or len(s.sum) != h.d_in or not math.isfinite(s.sum_sq_norm) or s.count < 0:
                problems.append(f"the statistics of {h.name} do not fit its d_in")
            gains = h.read_gains
            if gains is not None and (len(gains) != h.d_in or not all(math.isfinite(v) and v >= 0 for v in gains)):
                problems.append(f"the read gains of {h.name} are not {h.d_in} numbers ≥ 0")
        if problems:
            raise GspError(f"store {path} has inconsistent attributes ({'; '.join(problems)}); it is damaged: "
                           "harvest it again with --overwrite")  # fmt: skip


def _hooks_from_attrs(a: dict, version: int) -> tuple[HookMeta, ...]:
    if version == 1:  # one hook point, its fields at the top level
        return (HookMeta.from_json({**a, "name": f"L{_get(a, 'layer', int)}.{_get(a, 'site', str)}"}, ""),)
    hooks = _get(a, "hooks", list)
    return tuple(HookMeta.from_json(h, f"hooks[{i}].") for i, h in enumerate(hooks))


def _spec(spec: dict, version: int) -> dict:
    """Format 1 recorded one layer and site as `layer: 12`; the harvest options now take lists
    (`"12"`, `"5,9,12"`), so an old spec reads as the option a resume would give."""
    if version == 1 and isinstance(spec.get("layer"), int):
        return {**spec, "layer": str(spec["layer"])}
    return spec
