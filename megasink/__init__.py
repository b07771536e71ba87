"""megasink: sink-aware pretraining of decoder-only LLMs.

Python API (docs/design.md, "File formats and contracts")::

    cfg = megasink.load_config("configs/tiny-sink.yaml", overrides=["model.n_layers=2"])
    model = megasink.build_model(cfg)  # the whole config: .aux_loss follows cfg.aux_loss
    out = model(tokens)            # .logits [B,T,V], .importance [L,H], .aux_loss
    model, cfg = megasink.load_checkpoint("runs/x/checkpoints/step_100")
"""
from megasink.config import Config, ConfigError, load_config

__version__ = "0.1.0"


def build_model(cfg, aux_cfg=None):
    """A plain single-device ``Transformer`` (an ``nn.Module``).

    ``build_model(cfg)`` takes the whole ``Config``: the model follows ``cfg.model``, its
    ``.aux_loss`` uses ``cfg.aux_loss`` (coef, scale_by_heads), and when ``aux_loss.shared_heads``
    names an importance.json its shared heads are marked (and checked: >= 2 routed per layer).
    The integer form (top-m) is *measured on data*: the trainer does it at step 0 of a
    fine-tuning run, so here no head is shared. ``build_model(model_cfg, aux_cfg=None)`` takes a
    ``ModelConfig`` and an optional ``AuxLossConfig`` (default: its defaults) and shares no head.
    """
    from megasink.shared_heads import shared_mask_from_file
    from megasink.model.transformer import Transformer

    if isinstance(cfg, Config):
        if aux_cfg is not None:
            raise TypeError("build_model(cfg): a whole Config carries its aux_loss; pass aux_cfg only with a "
                            "ModelConfig")
        model = Transformer(cfg.model, cfg.aux_loss)
        shared = cfg.aux_loss.shared_heads
        if isinstance(shared, str) and shared:
            model.shared_heads.copy_(shared_mask_from_file(shared, cfg.model.n_layers, cfg.model.n_heads))
        return model
    return Transformer(cfg, aux_cfg)


def load_checkpoint(path, map_location="cpu"):
    """Load a megasink checkpoint of any layout as ``(model, cfg)`` on one device."""
    from megasink.checkpoint import load_full_model

    return load_full_model(path, map_location=map_location)


__all__ = ["Config", "ConfigError", "load_config", "build_model", "load_checkpoint", "__version__"]
