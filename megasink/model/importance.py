"""Head importance, its coefficient of variation, and the sink-aware auxiliary loss.

    Imp[l, h] = sum of G[t, h] over counted tokens / number of counted tokens
    L_aux     = coef * sum_l CV(Imp[l, routed])^2          CV = population std / mean
              ( * n_routed[l] per layer when scale_by_heads )

Counted tokens: every non-padding token; for vanilla attention each document's first token
(the sink itself, G = 0) is left out. Statistics are kept as *sums and counts* so that
parallel code can add them over data-parallel ranks / micro-batches and gather heads over
tensor-parallel ranks before the CV (docs/design.md, "The distributed aux-gradient
invariant"): see ``aux_loss_and_grad``. Shared heads: megasink/shared_heads.py.
"""
from __future__ import annotations

import torch

from megasink.model.kernels import SeqInfo


def token_weights(seq: SeqInfo, variant: str) -> torch.Tensor:
    """(B, T) fp32 1/0: which tokens count towards importance."""
    w = seq.valid
    if variant == "vanilla":
        w = w & ~seq.is_doc_start()
    return w.to(torch.get_default_dtype())


def gate_sum(gate: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """gate (B, nh, T), weights (B, T) -> (nh,) sum of the gate over counted tokens: one
    matrix-vector product over the token-major (B * T, nh) layout the kernels return (a view;
    a copy for other layouts), whose backward is one outer product (an einsum's: ~3x slower)."""
    B, nh, T = gate.shape
    return torch.mv(gate.transpose(1, 2).reshape(B * T, nh).t(), weights.reshape(-1).to(gate.dtype))


def importance(gate_sums: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """gate_sums (L, H), count () -> Imp (L, H): mean gate per head."""
    return gate_sums / count.clamp_min(1.0)


def routed_mean(imp: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """imp (L, H), routed (L, H) bool -> (L,) mean importance of each layer's routed heads."""
    r = routed.to(imp.dtype)
    return (imp * r).sum(-1) / r.sum(-1).clamp_min(1.0)


def vanishing_mean(mean: torch.Tensor) -> torch.Tensor:
    """(L,) bool: layers whose routed mean importance is 0 or subnormal, where CV^2 is taken as 0."""
    return mean < torch.finfo(mean.dtype).tiny


def cv_squared(imp: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """imp (L, H), routed (L, H) bool -> CV^2 (L,) over each layer's routed heads.

    Computed as the population mean of ((Imp - mean) / mean)^2: exact and scale invariant for
    any positive mean (importances [1, 3] * 1e-7 give 0.25, as [1, 3] do). A layer whose routed
    mean vanishes (``vanishing_mean``: every routed gate 0 or below fp underflow) has no defined
    CV; it counts as 0 with a zero gradient (nothing to balance, and no gradient could reach
    gates that small). The trainer names such layers in its log.
    """
    r = routed.to(imp.dtype)
    mean = routed_mean(imp, routed)  # (L,)
    vanishing = vanishing_mean(mean)
    safe = torch.where(vanishing, torch.ones_like(mean), mean)
    rel = (imp - mean[:, None]) / safe[:, None] * r  # (L, H) deviation relative to the mean
    cv2 = rel.pow(2).sum(-1) / r.sum(-1).clamp_min(1.0)
    return torch.where(vanishing, torch.zeros_like(cv2), cv2)


def vanishing_warning(imp: torch.Tensor, routed: torch.Tensor) -> str:
    """'' or a one-line warning naming the layers whose routed mean importance vanished."""
    layers = torch.nonzero(vanishing_mean(routed_mean(imp, routed))).flatten().tolist()
    if not layers:
        return ""
    return (f"layers {layers}: the routed heads' mean importance is below {torch.finfo(imp.dtype).tiny:.3g} "
            "(every gate ~0): their CV^2 counts as 0 and sends no gradient")


def aux_loss(imp: torch.Tensor, routed: torch.Tensor, coef: float, scale_by_heads: bool = False) -> torch.Tensor:
    """coef * sum_l CV(Imp[l, routed])^2 (times n_routed[l] with scale_by_heads)."""
    per_layer = cv_squared(imp, routed)
    if scale_by_heads:
        per_layer = per_layer * routed.sum(-1).to(per_layer.dtype)
    return coef * per_layer.sum()


def aux_loss_and_grad(gate_sums: torch.Tensor, count: torch.Tensor, routed: torch.Tensor, coef: float,
                      scale_by_heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For *global* statistics: L_aux and dL_aux/d gate_sums (L, H), both detached.

    Parallel code backpropagates ``(grad * local_gate_sums).sum()`` on each rank: the exact
    gradient of the global loss, with each token's contribution counted once, wherever it is.
    """
    sums = gate_sums.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = aux_loss(importance(sums, count.detach().to(sums.dtype)), routed, coef, scale_by_heads)
        (grad,) = torch.autograd.grad(loss, sums)
    return loss.detach(), grad


def top_m_indices(imp: torch.Tensor, m: int) -> torch.Tensor:
    """(L, m) head indices of each layer's m most important heads, most important first.

    Ties are broken by the lower head index (a stable sort), so equal importances (a converted
    model's identical gates) give the same choice on every rank and in every run.
    """
    return torch.sort(imp, dim=-1, descending=True, stable=True).indices[:, :m]


def top_m_shared(imp: torch.Tensor, m: int) -> torch.Tensor:
    """(L, H) bool: the m most important heads of each layer (the shared heads), ties as
    ``top_m_indices``."""
    mask = torch.zeros_like(imp, dtype=torch.bool)
    if m > 0:
        mask.scatter_(1, top_m_indices(imp, m), True)
    return mask


def tied_layers(imp: torch.Tensor, m: int) -> list[int]:
    """Layers where the m-th and (m+1)-th most important heads tie: the head index decided."""
    if not 0 < m < imp.shape[-1]:
        return []
    ranked = torch.sort(imp, dim=-1, descending=True, stable=True).values
    return torch.nonzero(ranked[:, m - 1] == ranked[:, m]).flatten().tolist()
