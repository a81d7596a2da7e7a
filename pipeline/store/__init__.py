"""The activation store: a self-describing Zarr v3 group that plain zarr can read.

Layout, format 2 (docs/store-format.md has every attribute):
    <store>/zarr.json                    attributes (meta.StoreMeta): what made it, its hook points, progress
    <store>/token_ids                    (n_contexts × C,), int32, shared by every hook point
    <store>/L12.resid_post/activations   (n_contexts × C, d_in), uint16 bfloat16 bit patterns or float32
    ...                                  a group per hook point (`STORE/L12.resid_post` opens one)
    <store>/chunk_crc32c                 (n_chunks, 2 + hook points), uint32: each chunk's crc32c at its place
Row r is context r // C, position r % C; BOS/EOS/PAD rows are kept (readers mask them). Format 1 (one
hook point, `activations` at the root) is still read and resumed.

The arrays are sharded: each shard file holds `shard_rows` rows as inner chunks of `chunk_rows`
rows, each chunk and the shard index carrying a crc32c checksum, so corruption is detected on read;
the checksum table binds every chunk to its place, so a shard file moved or swapped is detected too.

The package: `meta` (the typed attributes), `location` (local paths and fsspec URLs), `reader`
(ActivationStore: open, check, read), `shards` (whole chunks read from the shard files), `checksums`
(the checksum table), `writer` (StoreWriter: create, write and claim shards, finish), `ledger` (the
claims of one process or of each torchrun process).
"""

from pipeline.store.location import is_url, local, path_state
from pipeline.store.meta import CorpusRef, ModelRef, RowSums, Stats, StoreMeta, TokenizerRef
from pipeline.store.reader import ActivationStore, bf16_bits_to_f32, f32_to_bf16_bits
from pipeline.store.writer import Layout, StoreWriter

__all__ = [
    "ActivationStore", "CorpusRef", "Layout", "ModelRef", "RowSums", "Stats", "StoreMeta", "StoreWriter",
    "TokenizerRef", "bf16_bits_to_f32", "f32_to_bf16_bits", "is_url", "local", "path_state",
]  # fmt: skip
