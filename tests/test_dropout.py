"""ByteDropout: nn.Dropout's semantics (inverted dropout, exact expectation, identity in eval), its
mask from random bytes of a seeded per-rank generator."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepfm.model import ByteDropout, DeepArch


@pytest.mark.parametrize("p, threshold", [(0.5, 128), (0.3, 179), (0.0, 256), (0.9, 26), (0.999, 1)])
def test_keep_threshold_and_scale(p: float, threshold: int):
    d = ByteDropout(p)
    assert d.threshold == threshold and d.scale == 256 / threshold


def test_mask_is_the_bytes_below_the_threshold_of_the_seeded_generator():
    torch.manual_seed(11)
    d = ByteDropout(0.5)
    x = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4)
    y = d(x)
    g = torch.Generator().manual_seed((11 * 1_000_003) % (1 << 63))      # rank 0
    words = torch.empty(2, dtype=torch.int64).random_(-(1 << 63), None, generator=g)
    keep = words.view(torch.uint8).view(4, 4) < 128
    assert_close(y, torch.where(keep, 2 * x, torch.zeros_like(x)))


def test_expectation_and_gradient_and_eval():
    torch.manual_seed(5)
    d = ByteDropout(0.5)
    x = torch.ones(400, 1000, requires_grad=True)
    y = d(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert abs(y.mean().item() - 1.0) < 0.01                # 400k draws: sd of the mean ~0.002
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                  # d(x * m / k)/dx = m / k
    d.eval()
    assert d(x) is x


def test_the_deep_part_uses_it():
    arch = DeepArch(8, (4, 4), 0.5)
    assert sum(isinstance(m, ByteDropout) for m in arch.modules()) == 2
