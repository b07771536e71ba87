"""CPU route: PyTorch's fused CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``)
with a (B, 1, T, T) document mask, and its own backward carrying the lse gradient
(``lse_grad``). The kernel takes fewer kv heads (GQA) and q, k, v as strided views of the
(B, T, n, hd) projections; its out and lse come back token-major, (B, T, nh, hd) and (B, T, nh)
transposed, which the fake functions state so that torch.compile traces the same layout."""
from __future__ import annotations

from typing import Optional

import torch

from megasink.model.kernels.lse_grad import backward_with_lse_grad
from megasink.model.kernels.seq import SeqInfo, acc_dtype

_aten = torch.ops.aten


def _token_major(shape, dtype, device) -> torch.Tensor:
    """An empty (B, n, T, ...) tensor laid out as (B, T, n, ...), like the kernel's outputs."""
    B, n, T, *rest = shape
    return torch.empty((B, T, n, *rest), dtype=dtype, device=device).transpose(1, 2)


def _as_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x in ``like``'s strides (a copy only if they differ; the fakes promise these layouts)."""
    return x if x.stride() == like.stride() else like.copy_(x)


@torch.library.custom_op("megasink::cpu_flash_fwd", mutates_args=())
def cpu_flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float, lse_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse); ``lse_grad``: whether the backward is to carry lse's gradient."""
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, mask is None, attn_mask=mask,
                                                                 scale=scale)
    return _as_layout(out, _token_major(q.shape, q.dtype, q.device)), \
        _as_layout(lse, _token_major(q.shape[:3], acc_dtype(q.dtype), q.device))


@cpu_flash_fwd.register_fake
def _(q, k, v, mask, scale, lse_grad):
    return _token_major(q.shape, q.dtype, q.device), _token_major(q.shape[:3], acc_dtype(q.dtype), q.device)


@torch.library.custom_op("megasink::cpu_flash_bwd", mutates_args=())
def cpu_flash_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def kernel_bwd(dout, q, k, v, out):
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, mask is None, attn_mask=mask, scale=scale)

    grads = backward_with_lse_grad(kernel_bwd, dout, dlse, q, k, v, out)
    return tuple(_as_layout(g, _token_major(x.shape, x.dtype, x.device)) for g, x in zip(grads, (q, k, v)))


@cpu_flash_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, mask, scale):
    return tuple(_token_major(x.shape, x.dtype, x.device) for x in (q, k, v))


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, ctx.lse_grad = inputs
    ctx.save_for_backward(q, k, v, *output, mask)
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dlse = dlse if ctx.lse_grad else None  # an unused lse arrives as zeros: no shift for it
    dq, dk, dv = cpu_flash_bwd(dout, dlse, q, k, v, out, lse, mask, ctx.scale)
    return dq, dk, dv, None, None, None


cpu_flash_fwd.register_autograd(_backward, setup_context=_setup)


def cpu_flash_attention(q, k, v, scale: float, seq: SeqInfo, lse_grad: bool = True):
    """q (B, nh, T, hd), k/v (B, nkv, T, hd), any strides -> out (B, nh, T, hd), lse (B, nh, T) in fp32
    (fp64 for fp64 inputs)."""
    if q.device.type != "cpu":
        raise ValueError(f"the cpu_flash route runs on the CPU, got {q.device}")
    return cpu_flash_fwd(q, k, v, seq.additive_mask(q.dtype), scale, lse_grad)
