"""Shared test helpers: small model configs and a deterministic model builder."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")

from megasink.config import AuxLossConfig, ModelConfig  # noqa: E402


def small_model_cfg(attention: str = "sink", **kw) -> ModelConfig:
    base = dict(attention=attention, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, vocab_size=97, seq_len=48)
    base.update(kw)
    return ModelConfig(**base)


def build_seeded(cfg: ModelConfig, seed: int = 0, coef: float = 1e-2, dtype=torch.float32, perturb: bool = True):
    """A model with non-trivial sink logits / gate biases (so gates are not all equal)."""
    from megasink.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(cfg, AuxLossConfig(coef=coef)).to(dtype)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("sinks", "gate_bias")):
                    p.copy_(torch.randn_like(p))
    return model


def packed_doc_ids(B: int, T: int, cuts=(11, 30)) -> torch.Tensor:
    """(B, T) document ids with documents starting at 0 and at each cut."""
    d = torch.zeros(B, T, dtype=torch.long)
    for c in cuts:
        d[:, c:] += 1
    return d


@pytest.fixture(params=["vanilla", "sink", "gated"])
def variant(request):
    return request.param
