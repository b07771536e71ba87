"""The notebook API: megasink.build_model takes the whole Config (its aux_loss settings and a
shared-heads file) or the two-argument (model_cfg, aux_cfg=None) form."""
import json
import statistics

import pytest
import torch

import megasink

BASE = ["model.n_layers=2", "model.n_heads=4", "model.d_model=64", "model.vocab_size=97", "model.seq_len=32",
        "model.init_std=0.2"]


def _cv2(values) -> float:
    """Independent reference: population variance / mean^2 (statistics module, float64)."""
    return statistics.pvariance(values) / statistics.fmean(values) ** 2


def _aux_reference(imp: torch.Tensor, shared: torch.Tensor, coef: float) -> float:
    rows = imp.double().tolist()
    return coef * sum(_cv2([v for h, v in enumerate(row) if not shared[layer, h]]) for layer, row in enumerate(rows))


@pytest.mark.parametrize("variant", ["sink", "gated"])
def test_build_model_from_config_uses_its_aux_loss_settings(variant):
    cfg = megasink.load_config(f"configs/tiny-{variant}.yaml", BASE + ["aux_loss.coef=0.5"])
    tokens = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = megasink.build_model(cfg)
    out = model(tokens)
    no_shared = torch.zeros(2, 4, dtype=torch.bool)
    assert out.aux_loss.item() == pytest.approx(_aux_reference(out.importance, no_shared, 0.5), rel=1e-4)
    assert out.aux_loss.item() > 1e-6  # heads differ: the comparison is not vacuous
    torch.manual_seed(0)  # the two-argument form: same model, and the default coef without aux_cfg
    two_arg = megasink.build_model(cfg.model, cfg.aux_loss)(tokens)
    assert torch.equal(two_arg.aux_loss, out.aux_loss)
    torch.manual_seed(0)
    default = megasink.build_model(cfg.model)(tokens)
    default_coef = megasink.config.AuxLossConfig().coef
    assert default.aux_loss.item() == pytest.approx(_aux_reference(out.importance, no_shared, default_coef), rel=1e-4)
    with pytest.raises(TypeError, match="aux_cfg only with a ModelConfig"):
        megasink.build_model(cfg, cfg.aux_loss)


def test_build_model_applies_a_shared_heads_file_not_a_count(tmp_path):
    path = tmp_path / "importance.json"
    path.write_text(json.dumps({"shared_heads": [[3], [0, 2]]}))
    cfg = megasink.load_config("configs/tiny-sink.yaml", BASE + ["aux_loss.coef=0.5", f"aux_loss.shared_heads={path}"])
    model = megasink.build_model(cfg)
    expected = torch.tensor([[False, False, False, True], [True, False, True, False]])
    assert torch.equal(model.shared_heads, expected)
    out = model(torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1)))
    assert out.aux_loss.item() == pytest.approx(_aux_reference(out.importance, expected, 0.5), rel=1e-4)
    counted = megasink.load_config("configs/tiny-sink.yaml", BASE + ["aux_loss.shared_heads=1"])
    assert not megasink.build_model(counted).shared_heads.any()  # top-m is measured on data by the trainer
