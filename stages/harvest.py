"""gsp harvest: run a model up to its deepest hook point and write every hook point's activations into one
Zarr store (a group per hook point, token ids shared).

One path for one process and for many (torchrun): process r of W fills shards r, r + W, ... of one
store; with W = 1 that is every shard, claimed straight into the store in order (StoreClaims), and
with W > 1 each process claims its shards in its own record, merged by rank 0 at the end
(RankLedger). Work overlaps: a reader tokenizes and packs the corpus ahead of the model, the main
thread runs the early-stopped forward pass, and writers checksum and write whole shards behind it,
each claimed as soon as its files are complete (pipeline/workers.py). Batches never straddle a
shard, so a resumed run feeds the model exactly the batches an uninterrupted run would, and ends
with exactly the same store.
"""

import contextlib
import dataclasses
import functools
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import dist
from pipeline.config import content, differences, opt, stage_config
from pipeline.console import console, info, progress, warn
from pipeline.corpus import Cursor, check_corpus
from pipeline.errors import GspError
from pipeline.files import OutputLock
from pipeline.hooks import (
    ORDER,
    RESIDUAL_SITES,
    SITES,
    Point,
    activations_at,
    forward_order,
    hook_point,
    point_name,
    read_gains,
    site_width,
)
from pipeline.models import OFFLINE_DEFAULT, LoadedModel, decoder_layers, hf_token, load_model, model_name
from pipeline.paths import cache_dir
from pipeline.store import ActivationStore, Layout, RowSums, StoreWriter, is_url, local, path_state
from pipeline.store.checksums import TABLE
from pipeline.store.ledger import RankLedger, StoreClaims, other_worlds, rank_claims
from pipeline.store.location import entries
from pipeline.store.meta import Compute, CorpusRef, HookMeta, ModelRef, StoreMeta, TokenizerRef
from pipeline.workers import ContextReader, ReaderSpec, ShardWriter, Share

_CORPUS = tuple(f.name for f in dataclasses.fields(CorpusRef))  # harvest options that pick the documents


@stage_config("harvest")
@dataclass
class HarvestConfig:
    model: str = opt(OFFLINE_DEFAULT, "Model: offline:gemma-3-270m, a Hugging Face id, or a local folder.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of --model.")
    device: str = opt("auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N.", run_only=True)
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto",
        "Compute dtype: auto is bfloat16 on CUDA, float32 on CPU (float16 overflows Gemma's residual).",
        run_only=True,  # checked as resolved: the store records the device type and dtype it was computed in
    )
    layer: str = opt(
        "12",
        "Block index L of model.model.layers[L] to hook; several as 5,9,12,15 (one forward pass), or all.",
        aliases=("hook_layer",),
    )
    site: str = opt(
        "resid_post", "Site(s) at each layer: resid_post, mlp_out, attn_out, mlp_in (Gemma Scope 2's, and the "
        "transcoders' input); several as resid_post,mlp_out.",
    )  # fmt: skip
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
    store: str | None = opt(
        None, "Store folder; by default cache/stores/ MODEL_LLAYER_SITE_PART_TOKENS.", run_only=True
    )
    store_dtype: Literal["bfloat16", "float32"] = opt(
        "bfloat16", "Stored dtype: bfloat16 (bit patterns in uint16, half the disk) or float32."
    )
    shard_mib: float = opt(128.0, "Target size of one shard file in MiB (the unit of writing and of resume).")
    workers: Literal["threads", "processes"] = opt(
        "threads", "Run the corpus reader and shard writers on threads, or in processes (experimental, for GPUs; "
        "one process only, not under torchrun).", run_only=True,
    )  # fmt: skip

    def __post_init__(self):
        for name in ("tokens", "context_size", "batch_size", "shard_mib"):
            if getattr(self, name) <= 0:
                raise GspError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.context_size < 2:
            raise GspError("--context-size must be at least 2 (BOS and one token)")
        if self.layer != "all":
            layers = self.layer.split(",")
            if not all(v.strip().lstrip("-").isdigit() for v in layers):
                raise GspError(f"--layer should be a block index, a list like 5,9,12,15, or all; got '{self.layer}'")
            if any(int(v) < 0 for v in layers):
                raise GspError(f"--layer must be 0 or more, got {self.layer}")
            # one spelling per set of layers and sites: 12,5 is 5,12 (the store's name and its resume)
            self.layer = ",".join(str(v) for v in sorted({int(v) for v in layers}))
        if not 0 < self.heldout_fraction < 1:
            raise GspError(f"--heldout-fraction must be between 0 and 1, got {self.heldout_fraction}")
        for site in self.site.split(","):
            if site.strip() not in SITES:
                raise GspError(f"unknown site '{site}': choose one of {', '.join(SITES)}")
        self.site = ",".join(sorted({s.strip() for s in self.site.split(",")}, key=ORDER.__getitem__))

    def points(self, n_layers: int) -> list[Point]:
        """Every (layer, site) to harvest, in forward order; `all` is every block of the model."""
        layers = range(n_layers) if self.layer == "all" else sorted({int(v) for v in self.layer.split(",")})
        return forward_order([(layer, site.strip()) for layer in layers for site in self.site.split(",")])

    @property
    def store_path(self) -> str:
        if self.store:
            return self.store
        name = Path(model_name(self.model).rstrip("/")).name
        layers, sites = self.layer.replace(",", "-"), self.site.replace(",", "-")
        return str(cache_dir() / "stores" / f"{name}_L{layers}_{sites}_{self.part}_{self.tokens}")

    def corpus(self) -> CorpusRef:
        return CorpusRef(**{k: getattr(self, k) for k in _CORPUS})


def smoke_config(cfg: HarvestConfig) -> HarvestConfig:
    """--smoke-test: a tiny random Gemma 3 and a synthetic corpus (made under cache/smoke once), seconds.
    The store is cfg.store or cache/stores/smoke; like any harvest it resumes or keeps a store
    written with these settings and never replaces anything else."""
    from pipeline.tiny import make_tiny_model, write_corpus

    root = cache_dir() / "smoke"
    model = root / "tiny-gemma3"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    corpus = root / "corpus.txt"
    if not corpus.is_file():
        write_corpus(corpus)
    return dataclasses.replace(
        cfg, model=str(model), dataset=str(corpus), layer="1", tokens=8192, context_size=64, batch_size=16,
        shard_mib=0.25, store=cfg.store or str(cache_dir() / "stores" / "smoke"),
    )  # fmt: skip


def run_harvest(
    cfg: HarvestConfig, *, token: str | None = None, overwrite: bool = False, model: LoadedModel | None = None
) -> str:
    """Harvest activations into cfg.store_path, resuming a partial store written with the same parameters.

    Under torchrun every process runs this; rank 0 checks, creates and finally claims the store.
    `model` may be a model already loaded from cfg.model (notebooks, benchmarks).
    """
    path = cfg.store_path
    group = dist.setup(cfg.device)
    if cfg.workers == "processes" and group.world > 1:
        raise GspError("--workers processes runs one process only; under torchrun use --workers threads "
                       "(each torchrun process has its own reader and writers)")  # fmt: skip
    lock = OutputLock(None if is_url(path) else local(path), "gsp harvest") if group.main else contextlib.nullcontext()
    with lock:
        state = dist.on_main(group, lambda: _existing(cfg, path, overwrite))
        if state == "complete":
            if group.main:
                info(f"store {path} is already complete; nothing to do")
                _add_read_gains(path, lambda: model or load_model(cfg.model, device=str(group.device), dtype=cfg.dtype,
                                                                  revision=cfg.revision, token=token))  # fmt: skip
            dist.teardown(group)
            return path
        # the corpus opens and has the text column before anything is written (nor a model loaded)
        dist.on_main(group, lambda: check_corpus(cfg.dataset, split=cfg.split, dataset_config=cfg.dataset_config,
                                                 text_column=cfg.text_column, token=hf_token(token)))  # fmt: skip
        lm = model or load_model(cfg.model, device=str(group.device), dtype=cfg.dtype, revision=cfg.revision,
                                 token=token)  # fmt: skip
        points = cfg.points(len(decoder_layers(lm.model)))
        widths = {p: site_width(lm.model, *p) for p in points}  # layer/site errors before anything is written
        compute = Compute(lm.device.type, str(lm.dtype).removeprefix("torch."))
        dist.on_main(group, lambda: _prepare(cfg, path, lm, widths, compute, state, group.world))
        writer = StoreWriter.open(path)
        claims = StoreClaims(writer) if group.world == 1 else RankLedger(writer, group.rank, group.world)
        start_rows, t0 = writer.meta.rows_written, time.perf_counter()
        _harvest_shards(writer, claims, cfg, lm, token, group)
        dist.barrier(group)  # every process has claimed its shards
        if group.main:
            _finish(writer, claims, state != "resume", start_rows, time.perf_counter() - t0, group.world)
    dist.teardown(group)
    return path


# ------------------------------------------------------------------------------------- store setup
def _existing(cfg: HarvestConfig, path: str, overwrite: bool) -> str:
    """ "new" (nothing there, or a gsp store to replace), "replace" (a gsp store that holds no rows yet,
    started with other parameters), "resume" or "complete"; never touches a folder that is not a gsp store."""
    found = path_state(path)
    if found == "file":
        raise GspError(f"--store {path} is a file; give a folder path for the store")
    if found in ("missing", "empty"):
        return "new"
    if found != "zarr":
        raise GspError(f"{path} exists and is not a gsp store; choose another --store (nothing was changed)")
    if overwrite:
        _check_replaceable(path)
        return "new"
    store = ActivationStore.open_all(path)[0]
    diffs = differences(store.meta.spec, cfg, "store")
    if diffs and _holds_nothing(store, path):
        return "replace"
    if diffs:
        raise GspError(
            f"store {path} was harvested with other parameters ({'; '.join(diffs)}); "
            "use the same parameters to resume, another --store, or --overwrite to replace it"
        )
    return "complete" if store.complete else "resume"


def _holds_nothing(store: ActivationStore, path: str) -> bool:
    """Whether a store claims no rows (nor does any torchrun process's record) and holds only what gsp
    writes in a store: starting it again loses nothing, and deletes nothing gsp did not write (a harvest
    that failed before its first shard, rerun with other parameters, needs no --overwrite)."""
    ours = {"zarr.json", "token_ids", "progress", TABLE, "activations", *(h.name for h in store.meta.hooks)}
    return not store.rows_written and not rank_claims(store.group) and set(entries(path)) <= ours


def _check_replaceable(path: str) -> None:
    """--overwrite replaces only a gsp store: never a folder of someone else's data."""
    try:
        ActivationStore.open_all(path)
    except GspError as e:
        if "not a gsp activation store" in str(e):
            raise GspError(f"{path} is a Zarr group but not a gsp store; --overwrite will not replace it") from None
        # a damaged gsp store may be replaced


def _prepare(cfg: HarvestConfig, path: str, lm: LoadedModel, widths: dict, compute: Compute, state: str, world: int):
    """Rank 0: create the store, or check that this run may resume it."""
    if state == "replace":
        info(f"store {path} holds no rows yet and was started with other parameters: starting it again")
    if state in ("new", "replace"):
        _create_store(cfg, path, lm, widths, compute)
        return
    writer = StoreWriter.open(path)
    if writer.meta.compute != compute:
        raise GspError(
            f"store {path} was started with {writer.meta.compute.to_json()} but this run computes with "
            f"{compute.to_json()}; resume on the same kind of device (--device/--dtype) or start over with --overwrite"
        )
    others = other_worlds(writer, world)
    if others:
        how = "one process (no torchrun)" if others[0] == 1 else f"torchrun --nproc-per-node {others[0]}"
        raise GspError(f"store {path} was started by {others[0]} processes; resume it with {how}")
    if world > 1 and writer.meta.rows_written:
        raise GspError(f"store {path} was started by one process; resume it with one process, not torchrun")
    info(f"resuming {path} at row {writer.meta.rows_written:,} of {writer.n_rows:,}")


def _create_store(cfg: HarvestConfig, path: str, lm: LoadedModel, widths: dict, compute: Compute) -> None:
    """A store with a group per hook point; a shard holds `--shard-mib` of all the hook points together,
    so the memory of the shards in flight does not grow with the number of hook points."""
    tok = lm.tokenizer
    itemsize = 2 if cfg.store_dtype == "bfloat16" else 4
    layout = Layout.plan(cfg.context_size, sum(widths.values()), itemsize, shard_mib=cfg.shard_mib)
    hooks = tuple(
        HookMeta(point_name(*p), p[0], p[1], hook_point(*p), d, read_gains=read_gains(lm.model, *p))
        for p, d in widths.items()
    )
    meta = StoreMeta(
        model=ModelRef(cfg.model, lm.name, lm.revision, type(lm.model).__name__),
        hooks=hooks,
        context_size=cfg.context_size,
        dataset=cfg.corpus(),
        tokenizer=TokenizerRef(
            lm.name, type(tok).__name__, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        ),  # fmt: skip
        compute=compute,
        dtype=cfg.store_dtype,
        n_contexts_planned=math.ceil(cfg.tokens / cfg.context_size),
        chunk_rows=layout.chunk_rows,
        shard_rows=layout.shard_rows,
        spec=content(cfg),
    )
    StoreWriter.create(path, meta)


def _add_read_gains(path: str, load: Callable[[], LoadedModel]) -> None:
    """A complete store harvested before gsp recorded read gains gets them: only the model's norms are
    read and only the store's attributes change (fit's `--weighting reads` needs them)."""
    writer = StoreWriter.open(path)
    missing = [h.name for h in writer.meta.hooks if h.site in RESIDUAL_SITES and h.read_gains is None]
    if not missing:
        return
    lm = load()
    hooks = [h if h.name not in missing else dataclasses.replace(h, read_gains=read_gains(lm.model, h.layer, h.site))
             for h in writer.meta.hooks]  # fmt: skip
    writer.update(hooks=tuple(hooks))
    info(f"store {path}: recorded the read gains of {', '.join(missing)}")


def _finish(writer: StoreWriter, claims, created: bool, start_rows: int, seconds: float, world: int) -> None:
    """Rank 0, after every process has claimed its shards: mark the store complete and say what was written."""
    planned = writer.n_rows
    rows = claims.total_rows()
    if rows == 0:
        if created:
            _remove_new_store(writer.path, [h.name for h in writer.meta.hooks])
        d = writer.meta.dataset
        raise GspError(f"the corpus gave no text for this store (dataset {d.dataset}, part {d.part}, text "
                       f"column '{d.text_column}'): check --dataset, --text-column and --part; nothing was "
                       "harvested")  # fmt: skip
    claims.finish()
    if rows < planned:
        warn(f"the corpus ran out after {rows:,} of {planned:,} tokens; the store holds those")
    m = writer.meta
    who = f"{world} processes wrote" if world > 1 else "wrote"
    new = rows - start_rows
    hooks = f"d_in {m.hooks[0].d_in}" if len(m.hooks) == 1 else f"{len(m.hooks)} hook points"
    console.print(
        f"{who} {new:,} rows in {seconds:.1f} s ({new / seconds:,.0f} tok/s) to [bold]{writer.path}[/] "
        f"({rows:,} rows, {hooks}, {m.dtype})",
        highlight=False,
    )


def _remove_new_store(path: str, hooks: list[str]) -> None:
    """Delete the entries of a store this run created and left empty (nothing else at the path)."""
    import shutil

    names = ["token_ids", "progress", TABLE, *hooks]
    if is_url(path):
        from pipeline.store.location import filesystem

        fs, p = filesystem(path)
        for name in [*names, "zarr.json"]:
            if fs.exists(f"{p}/{name}"):
                fs.rm(f"{p}/{name}", recursive=True)
        return
    for name in names:
        shutil.rmtree(Path(local(path)) / name, ignore_errors=True)
    (Path(local(path)) / "zarr.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- the shard loop
def _harvest_shards(writer: StoreWriter, claims, cfg: HarvestConfig, lm: LoadedModel, token, group) -> None:
    """This process's shards (s % world == rank, not yet claimed), in order, each filled by the
    model and handed to the writers; the corpus reader starts where `claims` says."""
    C = cfg.context_size
    shard_contexts = writer.meta.shard_rows // C
    n_contexts = writer.n_rows // C
    done = claims.done()
    # lazily: a store planned far beyond its corpus (--tokens 1e12) has millions of shards it never fills
    ours = range(group.rank, math.ceil(n_contexts / shard_contexts), group.world)
    mine = (s for s in ours if s not in done)
    n_mine = len(ours) - sum(1 for s in done if s % group.world == group.rank)
    cursor, first = claims.start()
    process = cfg.workers == "processes"
    with tempfile.TemporaryDirectory(prefix="gsp-tokenizer-") as tok_dir, progress("tok", show=group.main) as bar:
        spec = _reader_spec(cfg, lm, token, cursor, tok_dir if process else None)
        if group.world > 1:  # shared tokenizing: each process keeps only its own shards' contexts

            def wanted(k: int) -> bool:
                shard = k // shard_contexts
                return shard % group.world == group.rank and shard not in done

            spec = dataclasses.replace(spec, share=Share(
                group.rank, group.world, wanted=wanted, limit=n_contexts,
                gather=functools.partial(dist.gather, group, pg=dist.cpu_group(group)),
            ))  # fmt: skip
        reader = ContextReader(spec, process=process)
        writers = ShardWriter(writer, claims.commit, workers=_writer_count(lm.device), process=process)
        ended = None
        try:
            name = f"harvest ({group.world} processes)" if group.world > 1 else "harvest"
            total = n_contexts * C if group.world == 1 else n_mine * shard_contexts * C
            task = bar.add_task(name, total=total, completed=first * C if group.world == 1 else 0)
            for shard in mine:
                want = min(shard_contexts, n_contexts - shard * shard_contexts)
                got = _fill_shard(writer, cfg, lm, reader, writers, shard, want, lambda n: bar.advance(task, n * C))
                if got < want:  # the corpus ended
                    ended = shard + (got > 0)
                    break
            writers.close()
            if ended is not None:
                claims.end(ended)
            if group.world > 1:
                reader.finish()  # the other processes need this one's share of the tokenizing to the end
        finally:
            reader.stop()
            writers.stop()


def _writer_count(device: torch.device) -> int:
    """On a GPU shards fill fast: checksum and write several at once (the node's cores shared by its
    processes); on a CPU two writers keep up."""
    if device.type != "cuda":
        return 2
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(2, (os.cpu_count() or 2) // (2 * per_node)))


def _reader_spec(cfg: HarvestConfig, lm, token: str | None, cursor: Cursor, tok_dir: str | None) -> ReaderSpec:
    """What the corpus reader needs, from `cursor` on; `tok_dir` given: for a child process."""
    if tok_dir:
        lm.tokenizer.save_pretrained(tok_dir)  # the child loads its own copy
    return ReaderSpec(
        documents={**{k: getattr(cfg, k) for k in _CORPUS}, "start": cursor.doc, "token": hf_token(token)},
        context_size=cfg.context_size,
        start=cursor,
        tokenizer=tok_dir or lm.tokenizer,
    )


def _fill_shard(writer: StoreWriter, cfg, lm, reader, writers, shard: int, want: int, advance) -> int:
    """Run the model over up to `want` contexts into one shard buffer per hook point and hand them to
    the writers.

    Nothing here waits for the device until the shard is full: activations are copied into pinned
    buffers asynchronously and the statistics stay on the device, so the GPU always has the next
    batch queued, as in a bare loop over the model.
    """
    C, dev, hooks = cfg.context_size, lm.device, writer.meta.hooks
    bf16 = writer.meta.dtype == "bfloat16"
    points = [(h.layer, h.site) for h in hooks]
    pin = dev.type == "cuda"
    acts = {h.name: torch.empty((want * C, h.d_in), dtype=torch.int16 if bf16 else torch.float32, pin_memory=pin)
            for h in hooks}  # fmt: skip
    tokens = np.empty((want, C), dtype=np.int32)
    special = torch.tensor(writer.meta.special_ids, device=dev)
    sum_D = {h.name: torch.zeros(h.d_in, dtype=torch.float64, device=dev) for h in hooks}
    sum_sq = {h.name: torch.zeros((), dtype=torch.float64, device=dev) for h in hooks}
    kept = torch.zeros((), dtype=torch.int64, device=dev)
    got, cursor = 0, None
    while got < want:
        batch = reader.take(min(cfg.batch_size, want - got))
        if not batch:
            break
        ids_BS = np.stack([ids for ids, _ in batch])
        cursor = batch[-1][1]
        ids_dev = torch.from_numpy(ids_BS).to(dev, non_blocking=True)
        captured = activations_at(lm.model, ids_dev, points)
        keep_N1 = ~torch.isin(ids_dev.reshape(-1, 1), special)
        rows = slice(got * C, (got + len(batch)) * C)
        for h, point in zip(hooks, points, strict=True):
            stored_ND = captured[point].reshape(-1, h.d_in)
            stored_ND = stored_ND.to(torch.bfloat16) if bf16 else stored_ND.float()
            # statistics of exactly the stored values over non-special rows, float64, on the device
            x = torch.where(keep_N1, stored_ND.double(), 0.0)
            sum_D[h.name] += x.sum(0)
            sum_sq[h.name] += x.square().sum()
            acts[h.name][rows].copy_(stored_ND.view(torch.int16) if bf16 else stored_ND, non_blocking=True)
        kept += keep_N1.sum()
        tokens[got : got + len(batch)] = ids_BS
        got += len(batch)
        advance(len(batch))
    if got:
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # the pinned buffers are complete
        out = {}
        for h in hooks:
            a = acts[h.name][: got * C].numpy()  # keeps the buffer alive until the writer is done with it
            out[h.name] = a.view(np.uint16) if bf16 else a
        sums = {h.name: RowSums(sum_D[h.name].cpu().numpy(), float(sum_sq[h.name]), int(kept)) for h in hooks}
        writers.put(shard, out, tokens[:got].reshape(-1), cursor, sums)
    return got
