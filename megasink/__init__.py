"""megasink: sink-aware pretraining of decoder-only LLMs.

Python API (DESIGN.md section 3)::

    cfg = megasink.load_config("configs/tiny-sink.yaml", overrides=["model.n_layers=2"])
    model = megasink.build_model(cfg.model)
    out = model(tokens)            # .logits [B,T,V], .importance [L,H], .aux_loss
    model, cfg = megasink.load_checkpoint("runs/x/checkpoints/step_100")
"""
from megasink.config import Config, ConfigError, load_config

__version__ = "0.1.0"


def build_model(model_cfg, aux_cfg=None):
    """A plain single-device ``Transformer`` for ``model_cfg`` (and optional AuxLossConfig)."""
    from megasink.model.transformer import Transformer

    return Transformer(model_cfg, aux_cfg)


def load_checkpoint(path, map_location="cpu"):
    """Load a megasink checkpoint of any layout as ``(model, cfg)`` on one device."""
    from megasink.train.checkpoint import load_full_model

    return load_full_model(path, map_location=map_location)


__all__ = ["Config", "ConfigError", "load_config", "build_model", "load_checkpoint", "__version__"]
