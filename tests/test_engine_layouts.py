"""Every (tp, pp, dp, ZeRO) layout trains exactly like one process on the same global batch."""

from __future__ import annotations

import json

import pytest
import torch

from tests.mp_util import torchrun
from tests.reference import OPTIM, reference_run

pytestmark = pytest.mark.multiproc

MODEL, SEED, STEPS = "tiny-pp", 3, 3


def _run(tmp_path, world, **spec):
    spec = {"model": MODEL, "seed": SEED, "steps": STEPS, "zero": 1, **spec}
    torchrun(world, "tests/workers/train_layout.py", tmp_path, json.dumps(spec), timeout=400)
    stages = [torch.load(p) for p in sorted(tmp_path.glob("stage*.pt"))]
    assert len(stages) == spec["pp"]
    state = {}
    for s in stages:
        state.update(s["state"])
    return stages[-1]["losses"], state


def _compare(losses, state, micro, accum, dp, loss_rtol=1e-4, param_atol=2e-5, loss="clip"):
    ref_losses, ref_state = reference_run(MODEL, micro * accum * dp, STEPS, SEED, loss=loss)
    assert len(losses) == len(ref_losses)
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= loss_rtol * abs(want), (losses, ref_losses)
    assert set(state) == set(ref_state)
    for key, want in ref_state.items():
        got = state[key].reshape(want.shape)
        if key.endswith("in_proj_bias"):
            # The key bias has an exactly-zero true gradient (softmax is shift-invariant), so Adam
            # turns fp32 rounding noise into steps of up to lr: compare q and v strictly, and k
            # only to within lr per step.
            q, k, v = (got - want).abs().chunk(3)
            assert max(q.max(), v.max()) <= param_atol, key
            assert k.max() <= OPTIM["lr"] * STEPS, key
            continue
        assert (got - want).abs().max() <= param_atol, key


LAYOUTS = [
    # (id, world, tp, pp, zero, micro, accum)
    ("dp2-zero1", 2, 1, 1, 1, 4, 1),
    ("dp2-zero2", 2, 1, 1, 2, 4, 1),
    ("dp2-zero3", 2, 1, 1, 3, 4, 1),
    ("dp2-zero3-accum2", 2, 1, 1, 3, 2, 2),
    ("tp2", 2, 2, 1, 1, 4, 1),
    ("pp2", 2, 1, 2, 1, 2, 2),
    ("pp2xdp2", 4, 1, 2, 1, 2, 2),
    ("tp2xpp2", 4, 2, 2, 1, 2, 2),
    ("tp2xpp2xdp2", 8, 2, 2, 1, 2, 2),
]


@pytest.mark.parametrize(
    "world, tp, pp, zero, micro, accum", [x[1:] for x in LAYOUTS], ids=[x[0] for x in LAYOUTS]
)
def test_layout_equals_single_process(tmp_path, world, tp, pp, zero, micro, accum):
    losses, state = _run(tmp_path, world, tp=tp, pp=pp, zero=zero, micro=micro, accum=accum)
    _compare(losses, state, micro, accum, world // (tp * pp))


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_recompute_pipeline_schedule_is_exact_too(tmp_path, recompute):
    """The two-pass schedule (no-grad features, then stock 1F1B) equals the reference."""
    losses, state = _run(
        tmp_path, 4, tp=1, pp=2, micro=2, accum=2, schedule="recompute", recompute=recompute
    )
    _compare(losses, state, 2, 2, 2)


def test_streamed_loss_in_a_pipeline_is_exact(tmp_path):
    """loss_mode=stream (owner blocks broadcast in turn) under PP=2 x DP=2."""
    losses, state = _run(tmp_path, 4, tp=1, pp=2, micro=2, accum=2, loss_mode="stream")
    _compare(losses, state, 2, 2, 2)


def test_grad_accumulation_equals_big_batch(tmp_path):
    """4 micro-batches of 2 on one process == the single-process batch of 8."""
    losses, state = _run(tmp_path, 1, tp=1, pp=1, micro=2, accum=4)
    _compare(losses, state, 2, 4, 1)


@pytest.mark.parametrize(
    "world, tp, pp, zero", [(2, 1, 2, 1), (2, 1, 1, 2)], ids=["pp2-bf16", "dp2-zero2-bf16"]
)
def test_bf16_trains_close_to_fp32_reference(tmp_path, world, tp, pp, zero):
    micro, accum = (2, 2) if pp > 1 else (4, 1)
    losses, _ = _run(
        tmp_path, world, tp=tp, pp=pp, zero=zero, micro=micro, accum=accum, precision="bf16"
    )
    ref_losses, _ = reference_run(MODEL, micro * accum * world // (tp * pp), STEPS, SEED)
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= 0.03 * abs(want), (losses, ref_losses)


@pytest.mark.parametrize("accum", [1, 2], ids=["accum1", "accum2"])
def test_zero3_with_activation_checkpointing_is_exact(tmp_path, accum):
    """ZeRO-3 + recomputation (DeepSpeed's fetch trace) over several steps equals the reference."""
    losses, state = _run(tmp_path, 2, tp=1, pp=1, zero=3, micro=2, accum=accum, recompute=True)
    _compare(losses, state, 2, accum, 2)


SIGLIP_LAYOUTS = [("dp2", 2, 1, 1, 4, 1), ("pp2", 2, 1, 2, 2, 2), ("tp2xpp2", 4, 2, 2, 2, 2)]


@pytest.mark.parametrize(
    "world, tp, pp, micro, accum",
    [x[1:] for x in SIGLIP_LAYOUTS],
    ids=[x[0] for x in SIGLIP_LAYOUTS],
)
def test_siglip_layout_equals_single_process(tmp_path, world, tp, pp, micro, accum):
    """train.loss: siglip (logit_bias travels with logit_scale) equals the reference."""
    losses, state = _run(tmp_path, world, tp=tp, pp=pp, micro=micro, accum=accum, loss="siglip")
    assert "logit_bias" in state
    _compare(losses, state, micro, accum, world // (tp * pp), loss="siglip")


@pytest.mark.parametrize("world, pp", [(1, 1), (2, 2)], ids=["pp1", "pp2"])
def test_recompute_schedule_replays_patch_dropout(tmp_path, world, pp):
    """With FLIP patch dropout, recompute (two passes, one RNG replay) == keep, bit for bit-ish."""
    common = dict(tp=1, pp=pp, micro=2, accum=4, patch_dropout=0.5)
    runs = {}
    for schedule in ("keep", "recompute"):
        out = tmp_path / schedule
        out.mkdir()
        runs[schedule] = _run(out, world, schedule=schedule, **common)
    (lk, sk), (lr, sr) = runs["keep"], runs["recompute"]
    assert lk == pytest.approx(lr, rel=1e-6, abs=1e-6)
    for key, want in sk.items():
        assert (sr[key] - want).abs().max() <= 1e-6, key
