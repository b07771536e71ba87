import json

import pytest
import torch

from megasink.model import importance as imp


def test_aux_loss_zero_for_equal_importance():
    i = torch.full((3, 4), 0.37)
    assert imp.aux_loss(i, torch.ones(3, 4, dtype=torch.bool), coef=1.0).item() == pytest.approx(0.0, abs=1e-12)


def test_aux_loss_hand_computed():
    i = torch.tensor([[0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    # mean 0.25; population variance (3 * 0.15^2 + 0.45^2) / 4 = 0.0675; CV^2 = 0.0675 / 0.0625 = 1.08
    routed = torch.ones(1, 4, dtype=torch.bool)
    assert imp.aux_loss(i, routed, coef=1.0).item() == pytest.approx(1.08, rel=1e-12)
    assert imp.aux_loss(i, routed, coef=1e-4).item() == pytest.approx(1.08e-4, rel=1e-12)
    assert imp.aux_loss(i, routed, coef=1.0, scale_by_heads=True).item() == pytest.approx(4 * 1.08, rel=1e-12)


def test_shared_heads_excluded():
    i = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.2, 0.4, 0.2, 0.2]], dtype=torch.float64)
    shared = imp.top_m_shared(i, 1)
    assert shared.tolist() == [[False, False, False, True], [False, True, False, False]]
    assert imp.aux_loss(i, ~shared, coef=1.0).item() == pytest.approx(0.0, abs=1e-12)
    assert imp.aux_loss(i, ~shared, coef=1.0, scale_by_heads=True).item() == pytest.approx(0.0, abs=1e-12)


def test_aux_loss_and_grad_matches_autograd():
    sums = torch.rand(3, 4, dtype=torch.float64) * 10
    count = torch.tensor(17.0, dtype=torch.float64)
    routed = torch.tensor([[True] * 4, [True, True, False, True], [True] * 4])
    loss, grad = imp.aux_loss_and_grad(sums, count, routed, coef=0.3)
    s = sums.clone().requires_grad_(True)
    ref = imp.aux_loss(imp.importance(s, count), routed, 0.3)
    ref.backward()
    assert torch.allclose(loss, ref.detach()) and torch.allclose(grad, s.grad)
    assert grad[1, 2] == 0  # a shared head gets no gradient


def test_shared_mask_from_file(tmp_path):
    p = tmp_path / "importance.json"
    p.write_text(json.dumps({"shared_heads": [[0, 2], [3, 1]]}))
    m = imp.shared_mask_from_file(p, 2, 4)
    assert m.tolist() == [[True, False, True, False], [False, True, False, True]]
    with pytest.raises(ValueError, match="2 layers, the model has 3"):
        imp.shared_mask_from_file(p, 3, 4)
