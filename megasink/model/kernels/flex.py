"""FlexAttention route (CUDA training, CPU forward only): PyTorch's FlexAttention with the
batch's one ``BlockMask`` (``SeqInfo.block_mask``, shared by all layers) and
``AuxRequest(lse=True)``. Its default Triton kernels carry dLSE in their backward; its FLASH
backend refuses dLSE, so the Triton backend is asked for by name where torch knows the option.
torch has no FlexAttention backward on CPU."""
from __future__ import annotations

import torch
from torch.nn.attention import flex_attention as _flex

from megasink.model.kernels.seq import SeqInfo, acc_dtype

_COMPILED = None  # flex_attention is only fast compiled; compiled once per process


def _kernel_options(device: torch.device):
    options = getattr(_flex, "FlexKernelOptions", None)
    if device.type == "cuda" and options is not None and "BACKEND" in getattr(options, "__annotations__", {}):
        return {"BACKEND": "TRITON"}
    return None


def flex_attention_lse(q, k, v, scale: float, seq: SeqInfo, lse_grad: bool = True):
    """q (B, nh, T, hd), k/v (B, nkv, T, hd) -> out (B, nh, T, hd), lse (B, nh, T) fp32 (natural log)."""
    global _COMPILED
    fn = _flex.flex_attention
    if q.device.type == "cuda":
        if _COMPILED is None:
            _COMPILED = torch.compile(_flex.flex_attention, dynamic=False)
        fn = _COMPILED
    out, aux = fn(q, k, v, block_mask=seq.block_mask(), scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                  return_aux=_flex.AuxRequest(lse=True), kernel_options=_kernel_options(q.device))
    return out, aux.lse.to(acc_dtype(q.dtype))
