"""``SeqInfo``: the layout of one batch (documents, positions, masks), built once per batch
and read by every layer. Each attention route takes what it needs from it; ``prepare``
builds that once, before the layers run, so a compiled block only reads it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


class BackendError(RuntimeError):
    """An attention backend asked to do something it cannot do correctly."""


@dataclass
class SeqInfo:
    """Per-batch sequence layout shared by all layers. Build it with ``SeqInfo.build``.

    Without document ids the batch is one document per row. Document id -1 marks padding: a
    run of it is its own "document" (so no row is empty) and is excluded from importance.
    """

    doc_ids: Optional[torch.Tensor]  # (B, T) int64, non-decreasing per row, or None
    positions: torch.Tensor  # (B, T) position within the document (RoPE)
    first_idx: torch.Tensor  # (B, T) index of the first token of each token's document
    valid: torch.Tensor  # (B, T) bool, False on padding
    _cache: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def build(tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> "SeqInfo":
        B, T = tokens.shape
        ar = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
        if doc_ids is None:
            zeros = torch.zeros_like(ar)
            return SeqInfo(None, ar, zeros, torch.ones(B, T, dtype=torch.bool, device=tokens.device))
        if doc_ids.shape != tokens.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != tokens shape {tuple(tokens.shape)}")
        doc_ids = doc_ids.to(tokens.device)
        start = torch.ones_like(doc_ids, dtype=torch.bool)
        start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        first = torch.where(start, ar, torch.zeros_like(ar)).cummax(dim=1).values  # (B, T)
        return SeqInfo(doc_ids, ar - first, first, doc_ids >= 0)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positions.shape)

    def is_doc_start(self) -> torch.Tensor:
        """(B, T) bool: the token is the first of its document (the vanilla sink)."""
        return self.positions == 0

    def bool_mask(self) -> torch.Tensor:
        """(B, T, T) True where query t may attend to key s (causal, same document)."""
        if "bool" not in self._cache:
            B, T = self.shape
            causal = torch.ones(T, T, dtype=torch.bool, device=self.positions.device).tril()
            d = self.doc_ids
            self._cache["bool"] = causal.expand(B, T, T) if d is None else causal & (d[:, :, None] == d[:, None, :])
        return self._cache["bool"]

    def additive_mask(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """(B, 1, T, T) 0/-inf (causal and same document), or None for one document per row
        (the kernel's own causal flag then does it)."""
        if self.doc_ids is None:
            return None
        key = ("additive", dtype)
        if key not in self._cache:
            allowed = self.bool_mask()[:, None]  # (B, 1, T, T)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._cache[key] = mask.masked_fill(~allowed, float("-inf"))
        return self._cache[key]

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens, max_seqlen) as variable-length kernels take them: the (n_docs + 1,) int32
        offsets of the documents in the flattened (B * T) token axis (every row starts a
        document; a padding run is one), and T, a bound on every document's length that stays
        the same from batch to batch (so a compiled block never recompiles for it). One host
        sync per batch (the documents' count)."""
        if "varlen" not in self._cache:
            starts = (self.positions.reshape(-1) == 0).nonzero().flatten()
            total = torch.tensor([self.positions.numel()], device=starts.device)
            cu = torch.cat([starts, total]).to(torch.int32)  # (n_docs + 1,)
            torch._dynamo.maybe_mark_dynamic(cu, 0)  # its length changes per batch: no recompiles
            self._cache["varlen"] = (cu, self.shape[1])
        return self._cache["varlen"]

    def prepare(self, backend: str, dtype: torch.dtype) -> None:
        """Build what attention route ``backend`` reads, so that the layers (compiled or not)
        only read the cache."""
        if backend in ("flash", "sdpa"):
            self.additive_mask(dtype)
        elif backend == "eager":
            self.bool_mask()
        elif backend == "varlen":
            self.varlen()
        elif backend == "flex":
            self.block_mask()

    def block_mask(self):
        """FlexAttention ``BlockMask`` (causal, same document), one per batch for all layers."""
        if "block_mask" not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            B, T = self.shape
            doc = self.doc_ids

            def causal(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx

            def same_doc(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

            mod, batch = (causal, None) if doc is None else (same_doc, B)
            self._cache["block_mask"] = create_block_mask(mod, batch, None, T, T, device=self.positions.device)
        return self._cache["block_mask"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types and fp32, fp64 stays fp64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)
