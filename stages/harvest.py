"""gsp harvest: run a model up to one hook point and write its activations into a Zarr store.

Work overlaps: a reader tokenizes and packs the corpus ahead of the model, the main thread runs the
early-stopped forward pass, and writers checksum and write whole shards behind it, committed in
order (pipeline/workers.py). Batches never straddle a shard, so a resumed run feeds the model
exactly the batches an uninterrupted run would, and ends with exactly the same store.
"""

import contextlib
import dataclasses
import fcntl
import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import dist
from pipeline.config import opt, stage_config
from pipeline.console import console, info, progress, warn
from pipeline.corpus import Cursor
from pipeline.errors import GspError
from pipeline.hooks import SITES, Site, activations, hook_point, site_module, site_width
from pipeline.models import OFFLINE_DEFAULT, LoadedModel, hf_token, load_model, model_name
from pipeline.paths import cache_dir
from pipeline.store import ActivationStore, Layout, RowSums, is_url, local, path_state
from pipeline.workers import ContextReader, ReaderSpec, ShardWriter, Share

# Fields that only say where or how to run, not what the store holds; all others must match on resume.
_RUN_ONLY = ("store", "device", "dtype", "workers")  # device and dtype are checked as resolved
_CORPUS = ("dataset", "split", "dataset_config", "text_column", "part", "heldout_fraction", "seed")


@stage_config("harvest")
@dataclass
class HarvestConfig:
    model: str = opt(OFFLINE_DEFAULT, "Model: offline:gemma-3-270m, a Hugging Face id, or a local folder.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of --model.")
    device: str = opt("auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "Compute dtype: auto is bfloat16 on CUDA, float32 on CPU (float16 overflows Gemma's residual)."
    )
    layer: int = opt(12, "Block index L of model.model.layers[L] to hook.", aliases=("hook_layer",))
    site: Site = opt("resid_post", "Hook point: resid_post, mlp_out or attn_out (Gemma Scope 2's sites).")
    dataset: str = opt("wiki", "Corpus: wiki (offline Wikipedia), a Hub dataset id, or local .txt/.jsonl/.parquet.")
    split: str = opt("train", "Split of a Hub dataset.")
    dataset_config: str | None = opt(None, "Configuration name of a Hub dataset (e.g. wikitext-103-raw-v1).")
    text_column: str = opt("text", "Column holding the text (Hub, .jsonl and .parquet datasets).")
    part: Literal["train", "heldout"] = opt(
        "train", "Which documents: train, or heldout (documents a train store never sees)."
    )
    heldout_fraction: float = opt(0.05, "Share of documents (by a hash of their text) kept for held-out stores.")
    tokens: int = opt(491_520, "Tokens to harvest (rounded up to whole contexts).")
    context_size: int = opt(128, "Tokens per context, the first being BOS.")
    batch_size: int = opt(32, "Contexts per forward pass.")
    seed: int = opt(0, "Seed of the document order.")
    store: str | None = opt(None, "Store folder; by default cache/stores/ MODEL_LLAYER_SITE_PART_TOKENS.")
    store_dtype: Literal["bfloat16", "float32"] = opt(
        "bfloat16", "Stored dtype: bfloat16 (bit patterns in uint16, half the disk) or float32."
    )
    shard_mib: float = opt(128.0, "Target size of one shard file in MiB (the unit of writing and of resume).")
    workers: Literal["threads", "processes"] = opt(
        "threads", "Run the corpus reader and shard writers on threads, or in processes (experimental, for GPUs)."
    )

    def __post_init__(self):
        for name in ("tokens", "context_size", "batch_size", "shard_mib"):
            if getattr(self, name) <= 0:
                raise GspError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.context_size < 2:
            raise GspError("--context-size must be at least 2 (BOS and one token)")
        if self.layer < 0:
            raise GspError(f"--layer must be 0 or more, got {self.layer}")
        if not 0 < self.heldout_fraction < 1:
            raise GspError(f"--heldout-fraction must be between 0 and 1, got {self.heldout_fraction}")
        if self.site not in SITES:
            raise GspError(f"unknown site '{self.site}': choose one of {', '.join(SITES)}")

    @property
    def store_path(self) -> str:
        if self.store:
            return self.store
        name = Path(model_name(self.model).rstrip("/")).name
        return str(cache_dir() / "stores" / f"{name}_L{self.layer}_{self.site}_{self.part}_{self.tokens}")

    def content_spec(self) -> dict:
        """The parameters that decide the store's content; a resume must match them exactly."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUN_ONLY}


def run_harvest(
    cfg: HarvestConfig, *, token: str | None = None, overwrite: bool = False, model: LoadedModel | None = None
) -> str:
    """Harvest activations into cfg.store_path, resuming a partial store written with the same parameters.

    `model` may be a model already loaded from cfg.model (notebooks, benchmarks); by default it is loaded here.
    """
    path = cfg.store_path
    group = dist.setup(cfg.device)
    if group.world > 1:
        return _run_ranks(cfg, path, token, overwrite, group)
    with _store_lock(path):
        store = _existing_store(cfg, path, overwrite)
        if store is not None and store.complete:
            info(f"store {path} is already complete ({store.rows_written:,} rows); nothing to do")
            return path
        lm = model or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, revision=cfg.revision, token=token)
        site_module(lm.model, cfg.layer, cfg.site)  # layer/site errors before anything is written
        d_in = site_width(lm.model, cfg.layer, cfg.site)
        compute = {"device": lm.device.type, "dtype": str(lm.dtype).removeprefix("torch.")}
        if store is None:
            store = _create_store(cfg, path, lm, d_in, compute)
        elif store.attrs["compute"] != compute:
            raise GspError(
                f"store {path} was started with {store.attrs['compute']} but this run computes with {compute}; "
                "resume on the same kind of device (--device/--dtype) or start over with --overwrite"
            )
        _harvest_into(store, cfg, lm, token)
    return path


def _run_ranks(cfg: HarvestConfig, path: str, token: str | None, overwrite: bool, group: dist.Group) -> str:
    """Under torchrun: rank 0 checks or creates the store (holding its lock throughout); then every
    process fills its own shards, s % world == rank; rank 0 claims them all at the end."""
    lm = load_model(cfg.model, device=str(group.device), dtype=cfg.dtype, revision=cfg.revision, token=token)
    site_module(lm.model, cfg.layer, cfg.site)
    d_in = site_width(lm.model, cfg.layer, cfg.site)
    compute = {"device": lm.device.type, "dtype": str(lm.dtype).removeprefix("torch.")}

    def prepare() -> bool:  # rank 0 only; True when there is nothing to do
        store = _existing_store(cfg, path, overwrite)
        if store is None:
            store = _create_store(cfg, path, lm, d_in, compute)
        elif store.complete:
            return True
        elif store.attrs["compute"] != compute:
            raise GspError(f"store {path} was started with {store.attrs['compute']}, this run computes with {compute}")
        elif store.rows_written:
            raise GspError(f"store {path} was started by one process; resume it with one process, not torchrun")
        others = store.other_worlds(group.world)
        if others:
            raise GspError(
                f"store {path} was started by {others[0]} processes; resume with --nproc-per-node {others[0]}"
            )
        return False

    with _store_lock(path) if group.main else contextlib.nullcontext():
        if dist.on_main(group, prepare):
            if group.main:
                info(f"store {path} is already complete; nothing to do")
            dist.teardown(group)
            return path
        store = ActivationStore.open(path, mode="r+")
        t0 = time.perf_counter()
        _harvest_ranks(store, cfg, lm, token, group)
        dist.barrier(group)  # every process has committed its shards
        if group.main:
            rows, seconds = store.finish_ranks(group.world), time.perf_counter() - t0
            console.print(
                f"{group.world} processes wrote {rows:,} rows to [bold]{path}[/] in {seconds:.1f} s "
                f"({rows / seconds:,.0f} tok/s, resumed shards included)",
                highlight=False,
            )
    dist.teardown(group)
    return path


def _harvest_ranks(store: ActivationStore, cfg: HarvestConfig, lm, token: str | None, group: dist.Group) -> None:
    """This process's shards. The packing of shard s depends on every document before it, so every
    process reads the whole document stream; the tokenizing is shared (pipeline.corpus.pack_shared)
    and each process packs and runs the model on its own shards' contexts only."""
    C = cfg.context_size
    shard_contexts = store.shard_rows // C
    n_contexts = store.activations.shape[0] // C
    done = store.rank_record(group.rank, group.world)["shards"]
    shards = range(math.ceil(n_contexts / shard_contexts))
    mine = [s for s in shards if s % group.world == group.rank and str(s) not in done]
    todo = frozenset(mine)
    commit = functools.partial(store.commit_rank, group.rank, group.world)
    side = dist.cpu_group(group)  # the reader thread's collectives, apart from the main thread's
    spec = ReaderSpec(
        documents={**{k: getattr(cfg, k) for k in _CORPUS}, "start": 0, "token": hf_token(token)},
        context_size=C,
        start=Cursor(),
        tokenizer=lm.tokenizer,
        share=Share(
            group.rank, group.world, wanted=lambda k: k // shard_contexts in todo, limit=n_contexts,
            gather=functools.partial(dist.gather, group, pg=side),
        ),
    )  # fmt: skip
    workers = 2 if lm.device.type == "cpu" else 4
    with progress("tok", show=group.main) as bar:
        reader = ContextReader(spec, process=False)
        writer = ShardWriter(store, workers=workers, process=False, commit=commit)
        try:
            task = bar.add_task(f"harvest ({group.world} processes)", total=len(mine) * shard_contexts * C)
            for shard in mine:
                want = min(shard_contexts, n_contexts - shard * shard_contexts)
                got = _fill_shard(store, cfg, lm, reader, writer, shard, want, lambda n: bar.advance(task, n * C))
                if got < want:  # the corpus ended
                    store.end_rank(group.rank, group.world, shard + (got > 0))
                    break
            writer.close()
            reader.finish()
        finally:
            reader.stop()
            writer.stop()


# ------------------------------------------------------------------------------------- store setup
def _existing_store(cfg: HarvestConfig, path: str, overwrite: bool) -> ActivationStore | None:
    """The store to resume, or None to start a new one (after checks that nothing foreign is replaced)."""
    state = path_state(path)
    if state == "file":
        raise GspError(f"--store {path} is a file; give a folder path for the store")
    if state in ("missing", "empty"):
        return None
    if state != "zarr":
        raise GspError(f"{path} exists and is not a gsp store; choose another --store (nothing was changed)")
    if overwrite:
        _open_for_overwrite(path)
        return None
    store = ActivationStore.open(path, mode="r+")
    spec = store.attrs.get("spec", {})
    diffs = [f"{k}: store has {spec.get(k)!r}, asked {v!r}" for k, v in cfg.content_spec().items() if spec.get(k) != v]
    if diffs:
        raise GspError(
            f"store {path} was harvested with other parameters ({'; '.join(diffs)}); "
            "use the same parameters to resume, another --store, or --overwrite to replace it"
        )
    if not store.complete:
        info(f"resuming {path} at row {store.rows_written:,} of {store.activations.shape[0]:,}")
    return store


def _open_for_overwrite(path: str) -> None:
    """--overwrite replaces only a gsp store: never a folder of someone else's data."""
    try:
        ActivationStore.open(path)
    except GspError as e:
        if "not a gsp activation store" in str(e):
            raise GspError(f"{path} is a Zarr group but not a gsp store; --overwrite will not replace it") from None
        # a damaged gsp store may be replaced


def _create_store(cfg: HarvestConfig, path: str, lm, d_in: int, compute: dict) -> ActivationStore:
    tok = lm.tokenizer
    n_contexts = math.ceil(cfg.tokens / cfg.context_size)
    itemsize = 2 if cfg.store_dtype == "bfloat16" else 4
    layout = Layout.plan(cfg.context_size, d_in, itemsize, shard_mib=cfg.shard_mib)
    attrs = {
        "spec": cfg.content_spec(),
        "model": {"spec": cfg.model, "name": lm.name, "revision": lm.revision, "class": type(lm.model).__name__},
        "layer": cfg.layer,
        "site": cfg.site,
        "hook_point": hook_point(cfg.layer, cfg.site),
        "dataset": {k: getattr(cfg, k) for k in _CORPUS},
        "seed": cfg.seed,
        "tokenizer": {
            "name": lm.name,
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
            "pad_id": tok.pad_token_id,
        },
        "compute": compute,
        "packing": "[BOS] + C-1 tokens of doc1 EOS doc2 EOS ...",
    }
    return ActivationStore.create(
        path, n_contexts=n_contexts, d_in=d_in, layout=layout, dtype=cfg.store_dtype, attrs=attrs
    )


class _store_lock:
    """An exclusive lock next to a local store, so two harvests never write one store at once.

    The `<store>.lock` file stays: unlinking it would let a third run lock a fresh file while a
    second still holds the old one. Object stores (s3://, gs://) offer no such lock: there, one
    harvest per store is the user's to keep."""

    def __init__(self, path: str):
        self.lock_path = None if is_url(path) else Path(f"{local(path).rstrip('/')}.lock")

    def __enter__(self):
        if self.lock_path is None:
            return self
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR)
        except OSError as e:
            raise GspError(f"cannot create the store at {self.lock_path.parent}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise GspError(f"another gsp harvest is writing {self.lock_path.with_suffix('')}; wait for it") from None
        return self

    def __exit__(self, *exc):
        if self.lock_path is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


# ------------------------------------------------------------------------------------- the loop
def _harvest_into(store: ActivationStore, cfg: HarvestConfig, lm, token: str | None) -> None:
    C = cfg.context_size
    shard_contexts = store.shard_rows // C
    n_contexts = store.activations.shape[0] // C
    first_shard = store.rows_written // store.shard_rows
    process = cfg.workers == "processes"
    # on a GPU shards fill fast: checksum and write several at once; on a CPU two writers keep up
    workers = min(8, max(2, (os.cpu_count() or 2) // 2)) if lm.device.type == "cuda" else 2
    start_rows, t0 = store.rows_written, time.perf_counter()
    done_contexts = first_shard * shard_contexts
    with tempfile.TemporaryDirectory(prefix="gsp-tokenizer-") as tok_dir, progress("tok") as bar:
        reader = ContextReader(_reader_spec(cfg, store, lm, token, tok_dir if process else None), process=process)
        writer = ShardWriter(store, workers=workers, process=process)
        try:
            task = bar.add_task("harvest", total=n_contexts * C, completed=done_contexts * C)
            for shard in range(first_shard, math.ceil(n_contexts / shard_contexts)):
                want = min(shard_contexts, n_contexts - shard * shard_contexts)
                got = _fill_shard(store, cfg, lm, reader, writer, shard, want, lambda n: bar.advance(task, n * C))
                done_contexts += got
                if got < want:
                    break
            writer.close()
        finally:
            reader.stop()
            writer.stop()
    if done_contexts < n_contexts:
        warn(f"the corpus ran out after {done_contexts * C:,} of {n_contexts * C:,} tokens; the store holds those")
    store.finish(done_contexts * C)
    seconds = time.perf_counter() - t0
    console.print(
        f"wrote {store.rows_written - start_rows:,} rows in {seconds:.1f} s "
        f"({(store.rows_written - start_rows) / seconds:,.0f} tok/s) to [bold]{store.path}[/] "
        f"({store.rows_written:,} rows, d_in {store.d_in}, {store.attrs['dtype']})",
        highlight=False,
    )


def _reader_spec(cfg: HarvestConfig, store, lm, token: str | None, tok_dir: str | None) -> ReaderSpec:
    """What the corpus reader needs, from the store's cursor on; `tok_dir` given: for a child process."""
    if tok_dir:
        lm.tokenizer.save_pretrained(tok_dir)  # the child loads its own copy
    cursor = Cursor(**store.attrs["cursor"])
    return ReaderSpec(
        documents={**{k: getattr(cfg, k) for k in _CORPUS}, "start": cursor.doc, "token": hf_token(token)},
        context_size=cfg.context_size,
        start=cursor,
        tokenizer=tok_dir or lm.tokenizer,
    )


def _fill_shard(store, cfg, lm, reader, writer, shard: int, want: int, advance) -> int:
    """Run the model over up to `want` contexts into one shard buffer and hand it to the writer.

    Nothing here waits for the device until the shard is full: activations are copied into a
    pinned buffer asynchronously and the statistics stay on the device, so the GPU always has the
    next batch queued, as in a bare loop over the model.
    """
    C, D, dev = cfg.context_size, store.d_in, lm.device
    bf16 = store.attrs["dtype"] == "bfloat16"
    acts = torch.empty((want * C, D), dtype=torch.int16 if bf16 else torch.float32, pin_memory=dev.type == "cuda")
    tokens = np.empty((want, C), dtype=np.int32)
    special = torch.tensor(store.special_ids, device=dev)
    sum_D = torch.zeros(D, dtype=torch.float64, device=dev)
    sum_sq = torch.zeros((), dtype=torch.float64, device=dev)
    kept = torch.zeros((), dtype=torch.int64, device=dev)
    got, cursor = 0, None
    while got < want:
        batch = reader.take(min(cfg.batch_size, want - got))
        if not batch:
            break
        ids_BS = np.stack([ids for ids, _ in batch])
        cursor = batch[-1][1]
        ids_dev = torch.from_numpy(ids_BS).to(dev, non_blocking=True)
        acts_ND = activations(lm.model, ids_dev, cfg.layer, cfg.site).reshape(-1, D)
        stored_ND = acts_ND.to(torch.bfloat16) if bf16 else acts_ND.float()
        # statistics of exactly the stored values over non-special rows, float64, on the device
        keep_N1 = ~torch.isin(ids_dev.reshape(-1, 1), special)
        x = torch.where(keep_N1, stored_ND.double(), 0.0)
        sum_D += x.sum(0)
        sum_sq += x.square().sum()
        kept += keep_N1.sum()
        rows = slice(got * C, (got + len(batch)) * C)
        acts[rows].copy_(stored_ND.view(torch.int16) if bf16 else stored_ND, non_blocking=True)
        tokens[got : got + len(batch)] = ids_BS
        got += len(batch)
        advance(len(batch))
    if got:
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # the pinned buffer is complete
        out = acts[: got * C].numpy()  # keeps `acts` alive until the writer is done with it
        sums = RowSums(sum_D.cpu().numpy(), float(sum_sq), int(kept))
        writer.put(shard, out.view(np.uint16) if bf16 else out, tokens[:got].reshape(-1), cursor, sums)
    return got
