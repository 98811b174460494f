"""TP=2 and TP=4 (real gloo processes) equal the single-process model: features, loss, grads."""

from __future__ import annotations

import pytest
import torch

from megaclip.config.model import load_preset
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters
from tests.mp_util import torchrun
from tests.workers.tp_model import batch, local_clip_loss

pytestmark = pytest.mark.multiproc


def reference(model_name: str, dp_rank: int):
    cfg = load_preset(model_name)
    model = ClipModel(cfg)
    init_parameters(model, cfg, seed=11)
    images, tokens = batch(cfg, 4, seed=100 + dp_rank)
    img, txt, scale = model(images, tokens)
    loss = local_clip_loss(img, txt, scale)
    loss.backward()
    return img, txt, loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("tp, world", [(2, 4), (4, 4)], ids=["tp2xdp2", "tp4"])
def test_tensor_parallel_matches_single_process(tmp_path, tp, world):
    torchrun(world, "tests/workers/tp_model.py", tmp_path, tp, "tiny")
    for dp_rank in range(world // tp):
        got = torch.load(tmp_path / f"rank{dp_rank * tp}.pt")
        img, txt, loss, grads = reference("tiny", dp_rank)
        assert (got["img"] - img).abs().max() <= 1e-5
        assert (got["txt"] - txt).abs().max() <= 1e-5
        assert abs(got["loss"].item() - loss.item()) <= 1e-5 * max(1.0, abs(loss.item()))
        assert set(got["grads"]) == set(grads)
        for name, ref in grads.items():
            scale = ref.abs().max().item() + 1e-12
            diff = (got["grads"][name] - ref).abs().max().item()
            assert diff <= 1e-5 * max(scale, 1.0), f"{name}: {diff} (scale {scale})"
