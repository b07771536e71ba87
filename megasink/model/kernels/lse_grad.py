"""The log-sum-exp gradient through a flash kernel's own backward: the one rule every fused
route (cpu_flash, varlen) uses. See docs/design.md, "Attention routes".

A flash backward computes dS = P (dP - D) with D = rowsum(dO * O), and reads ``out`` only
for D. The loss here also depends on lse (the sink and vanilla gates), and
d lse / d S = P, so the exact gradient is dS = P (dP - D + dLSE). Two ways to get it from an
unmodified kernel backward:

- **shifted O** (``shift_out``): pass O' with O'[:, 0] = O[:, 0] - dLSE / dO[:, 0]; then
  rowsum(dO * O') = D - dLSE. Same head dim, any number of kv heads, one copy of O.
- **augmented column** (``augmented_backward``), for rows with dLSE != 0 but dO[:, 0] = 0:
  one extra head-dim column (padded to the kernel's alignment) with v' = [v, 1],
  dO' = [dO, dLSE] and zeros in q, k, O: dP gains dLSE, D is unchanged. kv heads need no
  repeat: the extra column of v is the same 1 for every head.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# kernel_bwd(dout, q, k, v, out) -> (dq, dk, dv): the kernel's own backward, everything
# else (lse, scale, masks, sequence offsets) bound by the route
KernelBackward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def backward_with_lse_grad(kernel_bwd: KernelBackward, dout, dlse: Optional[torch.Tensor], q, k, v, out,
                           align: int = 1):
    """(dq, dk, dv) for gradients of out and lse. ``dlse`` None: nothing depends on lse, the
    kernel's own backward; else shaped like ``out[..., 0]``. ``align``: the head-dim multiple
    the kernel needs for the augmented fallback."""
    if dlse is None:
        return kernel_bwd(dout, q, k, v, out)
    shifted = shift_out(out, dout, dlse)
    if shifted is not None:
        return kernel_bwd(dout, q, k, v, shifted)
    return augmented_backward(kernel_bwd, dout, dlse, q, k, v, out, align)


def shift_out(out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor) -> Optional[torch.Tensor]:
    """A copy of O with its first column shifted per row, O'[..., 0] = O[..., 0] - dLSE / dO[..., 0],
    or None when a row with dLSE != 0 has dO[..., 0] = 0 (or the shift would not be finite in
    out's dtype). |dO0| below fp32's smallest normal counts as 0: a kernel that flushes
    subnormals to zero would drop the shift. The new column is rounded once, from fp32:
    dO0 * O'0 = dO0 * O0 - dLSE with |error| <= u |dO0 O0 - dLSE|, u the unit roundoff of out's
    dtype, however small dO0 is."""
    acc = torch.promote_types(out.dtype, torch.float32)
    d0 = dout[..., 0].to(acc)
    d0 = d0.masked_fill(d0.abs() < torch.finfo(torch.float32).tiny, 0.0)
    delta = dlse.to(acc) / d0  # shaped like out[..., 0]; inf where dO0 = 0 and dLSE != 0
    delta = delta.masked_fill(dlse == 0, 0.0)  # rows without dLSE stay (also 0 / 0 at dO0 = 0)
    col = out[..., 0].to(acc) - delta
    if not bool(col.abs().max() <= torch.finfo(out.dtype).max / 4):  # one host sync per call
        return None
    shifted = out.clone()  # out's strides; a new tensor, nothing autograd saved is modified
    shifted[..., 0] = col.to(out.dtype)
    return shifted


def _pad(x: torch.Tensor, pad: int, first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x with `pad` head-dim columns appended: `first` (x[..., 0]'s shape) in the first, zeros else."""
    cols = x.new_zeros(*x.shape[:-1], pad)
    if first is not None:
        cols[..., 0] = first.to(x.dtype)
    return torch.cat([x, cols], dim=-1)


def augmented_backward(kernel_bwd: KernelBackward, dout, dlse, q, k, v, out, align: int = 1):
    """The kernel backward at head dim hd + pad (pad >= 1 making it a multiple of ``align``):
    v' = [v, 1, 0..], dO' = [dO, dLSE, 0..], q', k', O' padded with zeros. Exact for every row."""
    hd = q.shape[-1]
    pad = align - hd % align if hd % align else align
    v_aug = _pad(v, pad, torch.ones_like(v[..., 0]))
    dq, dk, dv = kernel_bwd(_pad(dout, pad, dlse), _pad(q, pad), _pad(k, pad), v_aug, _pad(out, pad))
    return dq[..., :hd].contiguous(), dk[..., :hd].contiguous(), dv[..., :hd].contiguous()
