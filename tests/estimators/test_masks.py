"""Float masks select exactly what boolean comparisons do."""

import math

import pytest
import torch

from heavytail.estimators.masks import float_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", [torch.gt, torch.le, torch.eq, torch.ne])
def test_float_mask_equals_the_boolean_comparison(op, dtype):
    a = torch.tensor([[-1.0, 0.0, 2.0, math.nan], [math.inf, -math.inf, 1e-300, 5.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [math.inf, 0.0, 0.0, math.nan]], dtype=torch.float64)
    mask = float_mask(op, a, b, dtype)
    assert mask.dtype == dtype
    assert torch.equal(mask, op(a, b).to(dtype))
    assert torch.equal(float_mask(op, a, 0.5, dtype), op(a, 0.5).to(dtype))


def test_lerp_with_a_float_mask_selects_either_end_exactly():
    start = torch.randn(1000, dtype=torch.float64)
    end = torch.randn(1000, dtype=torch.float64) * 1e10
    weight = float_mask(torch.gt, torch.randn(1000), 0.0, torch.float64)
    assert torch.equal(torch.lerp(start, end, weight), torch.where(weight > 0, end, start))
