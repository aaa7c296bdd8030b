import pytest
import torch
from mmcv.cnn.bricks import DropPath

from mmdat.models.layers.drop_path import DropPathResidual


def test_matches_mmcv_drop_path_for_the_same_seed():
    x, y = torch.randn(64, 4, 3, 5), torch.randn(64, 4, 3, 5, requires_grad=True)
    torch.manual_seed(3)
    expected = x + DropPath(0.5)(y)
    torch.manual_seed(3)
    fused = DropPathResidual(0.5)(x, y)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    dropped = (fused == x).flatten(1).all(1)
    assert 0 < dropped.sum() < 64  # some samples lose the branch, the others keep it doubled
    torch.testing.assert_close(fused[~dropped], (x + 2 * y)[~dropped])
    fused.sum().backward()
    assert torch.equal(y.grad, torch.where(dropped, 0., 2.)[:, None, None, None].expand_as(y))


def test_plain_sum_when_evaluating_or_without_drop():
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(DropPathResidual(0.)(x, y), x + y)
    assert torch.equal(DropPathResidual(0.9).eval()(x, y), x + y)


def test_rejects_a_probability_outside_0_1():
    with pytest.raises(ValueError, match='drop path probability'):
        DropPathResidual(1.0)
