"""Synthetic benchmark batches: shapes, token layout, determinism."""

from __future__ import annotations

import itertools

import pytest
import torch

from megaclip.data.synthetic import SyntheticConfig, synthetic_batches
from megaclip.errors import ConfigError


def test_shapes_and_token_layout():
    cfg = SyntheticConfig(batch_size=64, image_size=16, seed=1)
    images, tokens = next(synthetic_batches(cfg))
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert tokens.shape == (64, 77) and tokens.dtype == torch.int64
    assert torch.all(tokens[:, 0] == cfg.sot_id)
    eot = tokens == cfg.eot_id
    assert torch.all(eot.sum(1) == 1)
    pos = eot.int().argmax(1)
    assert torch.equal(tokens.argmax(1), pos)  # EOT is the largest id (open_clip pooling)
    cols = torch.arange(77)
    assert torch.all(tokens[cols[None] > pos[:, None]] == 0)
    body = (cols[None] > 0) & (cols[None] < pos[:, None])
    assert torch.all(tokens[body] >= 1) and torch.all(tokens[body] < cfg.sot_id)
    assert len(set(pos.tolist())) > 10  # positions vary


def test_deterministic_and_rank_dependent():
    cfg = SyntheticConfig(batch_size=4, image_size=8, context_length=16, seed=7)
    a = list(itertools.islice(synthetic_batches(cfg), 3))
    b = list(itertools.islice(synthetic_batches(cfg), 3))
    c = list(itertools.islice(synthetic_batches(cfg, dp_rank=1), 3))
    for (ia, ta), (ib, tb), (ic, tc) in zip(a, b, c):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
        assert not torch.equal(ia, ic) and not torch.equal(ta, tc)
    assert not torch.equal(a[0][0], a[1][0])  # successive batches differ


def test_without_sot_and_validation():
    cfg = SyntheticConfig(
        batch_size=8, image_size=4, context_length=5, vocab_size=10, sot_id=None, eot_id=9
    )
    _, tokens = next(synthetic_batches(cfg))
    assert torch.all((tokens == 9).sum(1) == 1) and tokens.max() == 9
    with pytest.raises(ConfigError):
        SyntheticConfig(batch_size=0)
    with pytest.raises(ConfigError):
        SyntheticConfig(batch_size=1, eot_id=50000)
