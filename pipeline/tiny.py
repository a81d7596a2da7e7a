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


def synthetic_meta(n_contexts: int, d_in: int, layout, *, dtype: str = "float32") -> "StoreMeta":  # noqa: F821
    """The attributes of a store that no model wrote: every field filled, named "synthetic"."""
    from pipeline.store import CorpusRef, ModelRef, StoreMeta, TokenizerRef
    from pipeline.store.meta import Compute

    return StoreMeta(
        model=ModelRef("synthetic", "synthetic", "none", "none"),
        layer=0,
        site="resid_post",
        hook_point="model.layers.0.output",
        d_in=d_in,
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


def write_synthetic_store(path: Path, x_ND: np.ndarray, *, context_size: int = 16, bos_every_context: bool = True):
    """A real store holding given activations (no model): for `gsp fit --smoke-test` and tests.

    Rows are grouped in contexts of `context_size`; the first row of each is marked BOS (id 2) and
    its activation replaced by a huge vector, so readers that forget to mask BOS are caught.
    """
    from pipeline.corpus import Cursor
    from pipeline.store import ActivationStore, Layout, RowSums, StoreWriter

    n, d = x_ND.shape
    n_contexts = n // context_size
    x = x_ND[: n_contexts * context_size].astype(np.float32).copy()
    tokens = np.full(len(x), 7, dtype=np.int32)
    if bos_every_context:
        tokens[::context_size] = 2
        x[::context_size] = 1e4
    layout = Layout.plan(context_size, d, 4, chunk_rows=256, shard_mib=max(len(x) * d * 4 / 4 / 2**20, 0.001))
    store = StoreWriter.create(path, synthetic_meta(n_contexts, d, layout))
    for shard, start in enumerate(range(0, len(x), layout.shard_rows)):
        rows = slice(start, start + layout.shard_rows)
        keep = x[rows][tokens[rows] != 2].astype(np.float64)
        sums = RowSums(keep.sum(0), float((keep * keep).sum()), len(keep))
        store.write_shard(shard, x[rows], tokens[rows], Cursor(), sums)
    store.finish(len(x))
    return ActivationStore.open(path)
