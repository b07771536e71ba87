"""Shared and routed heads (fine-tuning): the rule every form of ``aux_loss.shared_heads`` obeys.

The top-m heads of each layer are *shared* (kept out of the CV) and the rest *routed*; every
layer keeps at least ``MIN_ROUTED_HEADS`` routed heads, since the CV of a single head is 0 and
its aux loss would silently vanish (docs/design.md, "Shared and routed heads"). This module
reads the ``importance.json`` form; it imports neither the config nor the model, so both can
use it, and torch only when called (the config, which imports it, stays light: data workers
read it without torch).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MIN_ROUTED_HEADS = 2  # per layer: the CV of a single routed head is 0 and balances nothing


def check_routed(shared: torch.Tensor, where: str) -> None:
    """Refuse shared heads (L, H) bool that leave a layer fewer than MIN_ROUTED_HEADS routed heads
    (the CV of one head is 0: its aux loss would silently vanish). The rule of both forms of
    aux_loss.shared_heads (a count is checked by config.validate)."""
    import torch

    n_routed = (~shared).sum(-1)
    bad = torch.nonzero(n_routed < MIN_ROUTED_HEADS).flatten().tolist()
    if bad:
        raise ValueError(
            f"{where}: layer(s) {bad} keep {n_routed[bad[0]].item()} routed head(s) of {shared.shape[1]}: every "
            f"layer needs at least {MIN_ROUTED_HEADS} routed (not shared) heads for the CV to balance; share fewer "
            f"heads (tools/diagnose_heads.py --top-m at most {shared.shape[1] - MIN_ROUTED_HEADS})")


def shared_mask_from_file(path: str | Path, n_layers: int, n_heads: int) -> torch.Tensor:
    """(L, H) bool from an importance.json's ``shared_heads`` ([layers][m] head indices),
    checked by ``check_routed``."""
    import torch

    data = json.loads(Path(path).read_text())
    if "shared_heads" not in data:
        raise ValueError(f"{path}: no 'shared_heads' (write it with tools/diagnose_heads.py --top-m M)")
    rows = data["shared_heads"]
    if len(rows) != n_layers:
        raise ValueError(f"{path}: shared_heads has {len(rows)} layers, the model has {n_layers}")
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, heads in enumerate(rows):
        for h in heads:
            if not 0 <= int(h) < n_heads:
                raise ValueError(f"{path}: layer {layer} names head {h}, the model has {n_heads} heads")
            mask[layer, int(h)] = True
    check_routed(mask, f"{path}: shared_heads")
    return mask
