"""pipeline.corpus: documents in a seeded order, the held-out split, and packing against a reference packer."""

import collections
import threading

import numpy as np
import pytest

from pipeline.corpus import Cursor, documents, pack, pack_shared
from pipeline.tiny import make_tokenizer, synthetic_documents


class WordTok:
    """A tokenizer whose tokens are the integers written in the text (so streams are easy to read)."""

    bos_token_id, eos_token_id = 2, 1

    def __init__(self, counter=None):
        self.counter = counter

    def __call__(self, texts, add_special_tokens):
        if self.counter is not None:
            self.counter[threading.current_thread().name] += len(texts)
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


def reference_pack(docs, tokenizer, C):
    """Packing written out plainly: tokenize every document, append EOS, concatenate, cut the stream
    into pieces of C-1 tokens and put BOS in front of each. The cursor after a context is (the
    document of its last token, how many of that document's tokens are packed)."""
    stream = []  # (token, document index, tokens of that document packed after this one)
    for index, text in docs:
        ids = tokenizer([text], add_special_tokens=False)["input_ids"][0] + [tokenizer.eos_token_id]
        stream += [(t, index, j + 1) for j, t in enumerate(ids)]
    out = []
    for k in range(len(stream) // (C - 1)):
        piece = stream[k * (C - 1) : (k + 1) * (C - 1)]
        out.append(([tokenizer.bos_token_id] + [t for t, _, _ in piece], Cursor(piece[-1][1], piece[-1][2])))
    return out


def _random_docs(seed, n=300):
    rng = np.random.default_rng(seed)
    return [(i, " ".join(str(w) for w in rng.integers(10, 99, rng.integers(1, 40)))) for i in range(0, 2 * n, 2)]


def test_packing_by_hand():
    docs = [(0, "10 11 12"), (1, "20 21"), (3, "30 31 32 33 34 35")]
    out = list(pack(iter(docs), WordTok(), 4))
    # stream: 10 11 12 EOS 20 21 EOS 30 31 32 33 34 35 EOS
    assert [c.tolist() for c, _ in out] == [[2, 10, 11, 12], [2, 1, 20, 21], [2, 1, 30, 31], [2, 32, 33, 34]]
    assert [cur for _, cur in out] == [Cursor(0, 3), Cursor(1, 2), Cursor(3, 2), Cursor(3, 5)]
    # starting from a cursor continues exactly where the earlier run stopped
    resumed = list(pack(iter(docs[2:]), WordTok(), 4, start=Cursor(3, 2)))
    assert [c.tolist() for c, _ in resumed] == [[2, 32, 33, 34]]


@pytest.mark.parametrize("C", [2, 5, 64])
def test_pack_equals_the_reference_packer(C):
    docs = _random_docs(C)
    want = reference_pack(docs, WordTok(), C)
    got = list(pack(iter(docs), WordTok(), C, tokenize_batch=7))
    assert len(got) == len(want) > 10
    for (ids, cursor), (ref_ids, ref_cursor) in zip(got, want, strict=True):
        assert ids.tolist() == ref_ids and cursor == ref_cursor
    # resuming after context k from its cursor gives the reference's contexts k+1, ...
    k = len(want) // 2
    cursor = want[k][1]
    rest = [d for d in docs if d[0] >= cursor.doc]
    resumed = list(pack(iter(rest), WordTok(), C, start=cursor))
    assert [c.tolist() for c, _ in resumed] == [ids for ids, _ in want[k + 1 :]]


def test_pack_with_a_real_tokenizer_equals_the_reference_packer():
    tok = make_tokenizer()
    docs = list(enumerate(synthetic_documents(120, seed=4)))
    want = reference_pack(docs, tok, 33)
    got = list(pack(iter(docs), tok, 33))
    assert [c.tolist() for c, _ in got] == [ids for ids, _ in want] and [c for _, c in got] == [c for _, c in want]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shared_tokenizing_gives_each_process_its_reference_contexts(world):
    """Processes (threads here) that share the tokenizing each get exactly their contexts of the
    reference stream, and each tokenizes about 2/world of the documents, not all of them."""
    docs = _random_docs(world)
    counted = collections.Counter()
    C, S, limit = 8, 5, 700  # contexts of 8, "shards" of 5 contexts, 700 contexts (the corpus has ~780)
    whole = reference_pack(docs, WordTok(), C)
    assert len(whole) > limit
    slots, barrier = [None] * world, threading.Barrier(world)

    def gather(rank, obj):
        slots[rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    def wanted(rank, k):
        return (k // S) % world == rank and k % 3 != 1  # any predicate works

    got = {}

    def run(rank):
        got[rank] = list(pack_shared(iter(docs), WordTok(counted), C, rank=rank, world=world,
                                     wanted=lambda k: wanted(rank, k), limit=limit,
                                     gather=lambda obj: gather(rank, obj), block=16))  # fmt: skip

    threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(world):
        assert [k for k, _, _ in got[rank]] == [k for k in range(limit) if wanted(rank, k)]
        for k, ids, cursor in got[rank]:
            assert ids.tolist() == whole[k][0] and cursor == whole[k][1]
    # which documents each process had to tokenize, from the stream positions (token counts + EOS)
    lengths = np.array([len(t.split()) + 1 for _, t in docs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    last_doc = int(np.searchsorted(starts + lengths, limit * (C - 1), side="left"))  # completes context limit-1
    blocks_read = min((last_doc // 16 + 1) * 16, len(docs))
    for rank in range(world):
        need = {j for j in range(blocks_read) if (j % 16) % world == rank}
        for j in range(blocks_read):
            first, last = starts[j] // (C - 1), (starts[j] + lengths[j] - 1) // (C - 1)
            if any(wanted(rank, k) for k in range(first, min(last, limit - 1) + 1)):
                need.add(j)
        assert counted[f"rank{rank}"] == len(need)
        assert len(need) < (2 / world if world > 1 else 1) * len(docs)


def test_heldout_documents_are_disjoint_and_complete(corpus):
    train = dict(documents(str(corpus), part="train", heldout_fraction=0.2))
    held = dict(documents(str(corpus), part="heldout", heldout_fraction=0.2))
    every = [t for t in corpus.read_text().split("\n\n") if t.strip()]
    assert held and not set(train.values()) & set(held.values())
    assert sorted([*train.values(), *held.values()]) == sorted(t.strip() for t in every)
    assert 0.1 < len(held) / len(every) < 0.3


def test_seed_changes_order_reproducibly(corpus):
    a = [i for i, _ in documents(str(corpus), seed=1)]
    b = [i for i, _ in documents(str(corpus), seed=1)]
    texts_1 = [t for _, t in documents(str(corpus), seed=1)]
    texts_2 = [t for _, t in documents(str(corpus), seed=2)]
    assert a == b and texts_1 != texts_2 and sorted(texts_1) == sorted(texts_2)
