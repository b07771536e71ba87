"""Training data: Megatron indexed datasets, packing, blending, resumable loading.

Trainer API::

    ds = build_dataset(data_cfg, seq_len, vocab_size, seed, split="train")   # or "valid"
    ds[i]                  # {"tokens": int64 (seq_len+1,), "doc_ids": int64 (seq_len+1,)}
    ds.bytes_per_token     # float or None, for bits-per-byte
    loader = build_loader(ds, micro_batch_size, dp_rank, dp_size, seed, shuffle=True)
    batch = loader.next_batch()          # "tokens", "targets", "doc_ids": int64 [B, seq_len]
    batch = to_device(batch, device)     # on the training device
    sd = loader.state_dict(); loader.load_state_dict(sd)
    for batch in iter_validation_batches(valid_ds, micro_batch_size, num_batches, dp_rank, dp_size): ...

Tokenizers, sentencepiece or Hugging Face (imported on use): ``megasink.data.tokenizer``
(``load_tokenizer(path)``, ``tokenizer_sha256``). Preprocessing (pyarrow, imported on use):
``megasink.data.preprocess``; command lines in ``tools/``.
"""
from megasink.data.blending import BlendedDataset, blending_index
from megasink.data.build import build_dataset, parse_data_paths, resolve_prefix
from megasink.data.indexed import IndexedDataset, IndexedDatasetWriter, IndexedFormatError
from megasink.data.loader import (DataLoader, DataLoaderState, IndexPermutation, build_loader,
                                  iter_validation_batches, to_device)
from megasink.data.packing import PackedDataset, SyntheticDataset

__all__ = [
    "BlendedDataset",
    "DataLoader",
    "DataLoaderState",
    "IndexPermutation",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "IndexedFormatError",
    "PackedDataset",
    "SyntheticDataset",
    "blending_index",
    "build_dataset",
    "build_loader",
    "iter_validation_batches",
    "parse_data_paths",
    "resolve_prefix",
    "to_device",
]
