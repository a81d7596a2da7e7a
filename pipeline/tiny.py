"""A tiny, randomly initialised Gemma 3 with its own small tokenizer, and a synthetic corpus.

Used by `--smoke-test` and the tests: it is a real `Gemma3ForCausalLM` saved with `save_pretrained`,
so it goes through exactly the code paths a downloaded model does, in seconds and offline.
"""

from pathlib import Path

import numpy as np

_WORDS = (
    "the of and to in is was for on that with as by at from his her an which are this be were "
    "it has had one their its first new after two who they also have been other years time city "
    "river king war music film state world school house early people known series water church "
    "north south east west empire language science theory energy light number system animal plant"
).split()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's tokenizer
SYNTHETIC_HOOK = "L0.resid_post"  # the hook point of a synthetic store (its only one, unless others are asked for)


def synthetic_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Sentences of random common words: enough structure for a tokenizer, cheap to make."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.integers(1, 6)):
            words = rng.choice(_WORDS, size=rng.integers(4, 16))
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def write_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """A .txt corpus, one document per paragraph (blank-line separated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(synthetic_documents(n_docs, seed)) + "\n", encoding="utf-8")
    return path


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(synthetic_documents(200, seed=1), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_model(path: Path, *, seed: int = 0, layers: int = 4) -> Path:
    """Save a random Gemma 3 (d_model 64, attn_out width 2×24=48 ≠ d_model) and its tokenizer at `path`."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the smoke tests' output
    tokenizer = make_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        sliding_window=16,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def synthetic_meta(n_contexts: int, d_in: int, layout, *, dtype: str = "float32", sites: dict | None = None):
    """The attributes of a store that no model wrote: every field filled, named "synthetic". `sites`
    {site: d_in} gives it several hook points at layer 0 (default: one resid_post of width d_in)."""
    from pipeline.hooks import hook_point, point_name
    from pipeline.store import CorpusRef, ModelRef, StoreMeta, TokenizerRef
    from pipeline.store.meta import Compute, HookMeta

    sites = sites or {"resid_post": d_in}
    return StoreMeta(
        model=ModelRef("synthetic", "synthetic", "none", "none"),
        hooks=tuple(HookMeta(point_name(0, site), 0, site, hook_point(0, site), d) for site, d in sites.items()),
        context_size=layout.context_size,
        dataset=CorpusRef("synthetic", "train", None, "text", "train", 0.05, 0),
        tokenizer=TokenizerRef("synthetic", "none", 8, 2, 1, 0),
        compute=Compute("cpu", "float32"),
        dtype=dtype,
        n_contexts_planned=n_contexts,
        chunk_rows=layout.chunk_rows,
        shard_rows=layout.shard_rows,
        spec={"synthetic": True},
    )


def write_synthetic_store(path: Path, x_ND: np.ndarray, *, context_size: int = 16, bos_every_context: bool = True,
                          more: dict[str, np.ndarray] | None = None):  # fmt: skip
    """A real store holding given activations (no model): for `gsp fit --smoke-test` and tests.

    Rows are grouped in contexts of `context_size`; the first row of each is marked BOS (id 2) and
    its activation replaced by a huge vector, so readers that forget to mask BOS are caught. `x_ND` is
    hook point L0.resid_post; `more` {site: rows} adds other hook points of the same rows (a
    transcoder's input and target: {"mlp_in": x, "mlp_out": y}).
    """
    from pipeline.corpus import Cursor
    from pipeline.store import ActivationStore, Layout, RowSums, StoreWriter

    arrays = {"resid_post": x_ND, **(more or {})}
    n = len(x_ND)
    n_contexts = n // context_size
    rows_n = n_contexts * context_size
    tokens = np.full(rows_n, 7, dtype=np.int32)
    if bos_every_context:
        tokens[::context_size] = 2
    data = {}
    for site, a in arrays.items():
        a = a[:rows_n].astype(np.float32).copy()
        if bos_every_context:
            a[::context_size] = 1e4
        data[f"L0.{site}"] = a
    width = sum(a.shape[1] for a in data.values())
    layout = Layout.plan(context_size, width, 4, chunk_rows=256, shard_mib=max(rows_n * width * 4 / 4 / 2**20, 0.001))
    meta = synthetic_meta(n_contexts, x_ND.shape[1], layout, sites={s: a.shape[1] for s, a in arrays.items()})
    store = StoreWriter.create(path, meta)
    for shard, start in enumerate(range(0, rows_n, layout.shard_rows)):
        rows = slice(start, start + layout.shard_rows)
        sums = {}
        for name, a in data.items():
            keep = a[rows][tokens[rows] != 2].astype(np.float64)
            sums[name] = RowSums(keep.sum(0), float((keep * keep).sum()), len(keep))
        store.write_shard(shard, {name: a[rows] for name, a in data.items()}, tokens[rows], Cursor(), sums)
    store.finish(rows_n)
    return ActivationStore.open_all(path)[0]
