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


def build_seeded(cfg: ModelConfig, seed: int = 0, coef: float = 1e-2, dtype=torch.float32, perturb: bool = True,
                 activation_checkpointing: bool = False):
    """A model with non-trivial sink logits / gate biases (so gates are not all equal); the same
    weights for the same seed whatever the other arguments."""
    from megasink.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(cfg, AuxLossConfig(coef=coef), activation_checkpointing=activation_checkpointing).to(dtype)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("sinks", "gate_bias")):
                    p.copy_(torch.randn_like(p))
    return model


def with_backend(model, backend: str):
    """A copy of ``model`` (same weights and buffers) whose config names attention ``backend``."""
    import dataclasses

    from megasink.model.transformer import Transformer

    copy = Transformer(dataclasses.replace(model.cfg, attention_backend=backend), model.aux_cfg,
                       activation_checkpointing=model.activation_checkpointing)
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).dtype)


def packed_doc_ids(B: int, T: int, cuts=(11, 30)) -> torch.Tensor:
    """(B, T) document ids with documents starting at 0 and at each cut."""
    d = torch.zeros(B, T, dtype=torch.long)
    for c in cuts:
        d[:, c:] += 1
    return d


@pytest.fixture(params=["vanilla", "sink", "gated"])
def variant(request):
    return request.param
