import json

import pytest
import torch

from megasink.model import importance as imp
from megasink.shared_heads import shared_mask_from_file


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
    m = shared_mask_from_file(p, 2, 4)
    assert m.tolist() == [[True, False, True, False], [False, True, False, True]]
    with pytest.raises(ValueError, match="2 layers, the model has 3"):
        shared_mask_from_file(p, 3, 4)


def _cv2_reference(values) -> float:
    """Population variance / mean^2 in exact rational arithmetic (independent of torch)."""
    from fractions import Fraction

    xs = [Fraction(float(v)) for v in values]
    mean = sum(xs) / len(xs)
    return float(sum((x - mean) ** 2 for x in xs) / len(xs) / mean**2)


@pytest.mark.parametrize("scale", [1.0, 1e-7, 1e-20, 1e-35, 1e3])
def test_cv_squared_is_scale_invariant_down_to_tiny_means(scale):
    """[1, 3] * 1e-7 has CV^2 0.25 like [1, 3] (a clamp of mean^2 at 1e-12 gave 0.01)."""
    base = torch.tensor([[1.0, 3.0, 2.0, 2.5], [0.5, 0.5, 0.7, 0.1]])
    routed = torch.tensor([[True, True, False, False], [True, True, True, True]])
    imp_ = base * scale
    got = imp.cv_squared(imp_, routed)
    for layer in range(2):
        ref = _cv2_reference(imp_[layer][routed[layer]].tolist())
        assert got[layer].item() == pytest.approx(ref, rel=1e-5), (scale, layer)


def test_cv_squared_gradient_at_tiny_mean_matches_float64_formula():
    x = torch.tensor([[1e-7, 3e-7, 2e-7]], dtype=torch.float64, requires_grad=True)
    routed = torch.ones(1, 3, dtype=torch.bool)
    (g,) = torch.autograd.grad(imp.cv_squared(x, routed).sum(), x)
    y = x.detach().clone().requires_grad_(True)  # the textbook formula, no clamp, in float64
    ref = ((y - y.mean()) ** 2).mean() / y.mean() ** 2
    (g_ref,) = torch.autograd.grad(ref, y)
    assert torch.allclose(g, g_ref, rtol=1e-10)


def test_cv_squared_vanishing_mean_is_zero_with_zero_gradient():
    x = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.4, 0.3]], requires_grad=True)
    routed = torch.ones(2, 3, dtype=torch.bool)
    cv2 = imp.cv_squared(x, routed)
    assert cv2[0].item() == 0.0
    assert cv2[1].item() == pytest.approx(_cv2_reference([0.2, 0.4, 0.3]), rel=1e-5)
    (g,) = torch.autograd.grad(cv2.sum(), x)
    assert torch.isfinite(g).all() and g[0].abs().max() == 0 and g[1].abs().max() > 0
    assert "layers [0]" in imp.vanishing_warning(x.detach(), routed)
    assert imp.vanishing_warning(x.detach()[1:], routed[1:]) == ""
    # a layer whose *shared* heads carry all the weight vanishes just the same
    y = torch.tensor([[0.9, 0.0, 0.0]])
    assert imp.cv_squared(y, torch.tensor([[False, True, True]])).item() == 0.0


def test_top_m_ties_go_to_the_lower_head_index():
    """Equal importances (a converted model's identical gates) are ranked by head index."""
    i = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.7, 0.7, 0.1], [0.3, 0.9, 0.3, 0.3]])
    for m in (1, 2):
        ref = [sorted(range(4), key=lambda h: (-row[h], h))[:m] for row in i.tolist()]  # independent ranking
        assert imp.top_m_indices(i, m).tolist() == ref
        assert imp.top_m_shared(i, m).tolist() == [[h in r for h in range(4)] for r in ref]
    assert imp.tied_layers(i, 1) == [0, 1] and imp.tied_layers(i, 2) == [0, 2]


@pytest.mark.parametrize("shared,ok", [([[0, 1], [2, 3]], True), ([[0, 1, 2], [3]], False),
                                       ([[0], [0, 1, 2, 3]], False)])
def test_shared_heads_file_leaves_two_routed_heads(tmp_path, shared, ok):
    """The file form obeys the count form's rule: every layer keeps >= 2 routed heads."""
    p = tmp_path / "importance.json"
    p.write_text(json.dumps({"shared_heads": shared}))
    if ok:
        assert shared_mask_from_file(p, 2, 4).sum().item() == 4
    else:
        with pytest.raises(ValueError, match="at least 2 routed"):
            shared_mask_from_file(p, 2, 4)
