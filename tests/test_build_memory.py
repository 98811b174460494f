"""Sharded construction: a rank allocates its own share of the parameters, not the model."""

from __future__ import annotations

import json

import pytest
import torch

from megaclip.config.model import load_preset
from megaclip.model.init import fill_local, init_full
from megaclip.parallel.shapes import shard
from tests.mp_util import torchrun
from tests.workers.build_memory import MODEL

MIB = 2**20


def _full_params() -> int:
    from megaclip.config.model import model_from_dict
    from megaclip.model.flops import model_cost

    return model_cost(model_from_dict(MODEL, where="probe")).params_total


@pytest.mark.multiproc
@pytest.mark.parametrize("tp, zero", [(2, 0), (1, 3)], ids=["tp2", "dp2-zero3"])
def test_a_rank_allocates_only_its_share_while_building(tmp_path, tp, zero):
    """Peak RSS growth of construction <= own parameters + the init's bounded working set.

    The working set: generated rows (init.CHUNK elements, and their TP slice) and one random
    block (init.BLOCK); ZeRO-3's zero.Init also holds one layer whole while partitioning it.
    16 MiB cover the allocator. The whole model would be twice the share.
    """
    from megaclip.model import init

    spec = json.dumps({"tp": tp, "zero": zero})
    # A fixed mmap threshold: freed large blocks go back to the kernel at once, so RSS follows
    # live memory (glibc's dynamic threshold would keep freed 1-32 MB blocks in its arena).
    env = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    torchrun(2, "tests/workers/build_memory.py", tmp_path, spec, env=env)
    full = _full_params() * 4
    working = 4 * (2 * init.CHUNK + init.BLOCK)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["owned"] < 0.6 * full  # the share is about half the model here
        allowed = got["owned"] + working + (got["largest"] if zero == 3 else 0) + 16 * MIB
        assert got["growth"] <= allowed, (rank, got, full)


@pytest.mark.parametrize("dim, stride", [(0, 3), (0, 1), (1, 1), (None, 1)])
@pytest.mark.parametrize("start", [0, 5, 1000])
def test_shard_init_equals_the_slice_of_the_full_init(monkeypatch, dim, stride, start):
    """Any TP shard and any flat range of it (a ZeRO-3 partition) equals the full value's slice."""
    import megaclip.model.init as init

    monkeypatch.setattr(init, "BLOCK", 97)  # many random blocks, odd boundaries
    monkeypatch.setattr(init, "CHUNK", 300)  # many generation chunks
    cfg = load_preset("tiny")
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    full = init_full(key, (96, 32), cfg, seed=4)
    for rank in range(2):
        local = full if dim is None else shard(full, dim, stride, rank, 2)
        n = local.numel() - start - 7
        dest = torch.empty(n, dtype=torch.float64)
        fill_local(dest, key, tuple(local.shape), (dim, stride), (rank, 2), cfg, 4, start)
        assert torch.equal(dest.float(), local.reshape(-1)[start : start + n])


def test_init_statistics_follow_the_rules():
    """Normal draws have the rule's std, LayerNorm gains are 1, biases 0, blocks differ."""
    cfg = load_preset("ViT-B-32")
    w = init_full("visual.transformer.resblocks.0.attn.in_proj_weight", (2304, 768), cfg, 0)
    assert abs(w.std().item() - 768**-0.5) < 0.01 * 768**-0.5
    assert abs(w.mean().item()) < 1e-3
    b0, b1 = w.flatten()[:700_000], w.flatten()[1 << 20 : (1 << 20) + 700_000]  # two blocks
    assert abs(torch.corrcoef(torch.stack([b0, b1]))[0, 1].item()) < 0.01
    assert torch.equal(init_full("ln_final.weight", (512,), cfg, 0), torch.ones(512))
    assert torch.equal(init_full("ln_final.bias", (512,), cfg, 0), torch.zeros(512))
    other = init_full("visual.transformer.resblocks.1.attn.in_proj_weight", (2304, 768), cfg, 0)
    assert not torch.equal(w, other)
