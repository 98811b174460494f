"""Communication volumes and the step-time model on hand-checkable cases (tiny preset)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.model.flops import model_cost
from megaclip.perf.calibration import BAND, CALIBRATED, RUNS, cross_check_ratio, fit, predict
from megaclip.perf.comm import (
    all_gather_bytes,
    all_reduce_bytes,
    dp_transfers,
    loss_transfers,
    placement,
    pp_transfers,
    reduce_scatter_bytes,
    tp_transfers,
)
from megaclip.perf.devices import DEVICES, get_device
from megaclip.perf.memory import even_stages
from megaclip.perf.timing import Cluster, Efficiency, step_time

TINY = load_preset("tiny")  # W = 32 both towers, 2 + 2 blocks, S_v = 17, S_t = 16, E = 32


def par(**kw) -> ParallelConfig:
    base = dict(tp=1, pp=1, dp=4, zero_stage=0, micro_batch_size=2, grad_accum_steps=3)
    return ParallelConfig(**{**base, "precision": "bf16", **kw})


def test_ring_formulas():
    assert all_reduce_bytes(100, 4) == 150
    assert reduce_scatter_bytes(100, 4) == 75
    assert all_gather_bytes(100, 4) == 75
    assert all_reduce_bytes(100, 1) == reduce_scatter_bytes(100, 1) == 0
    # all-reduce = reduce-scatter + all-gather
    assert all_reduce_bytes(96, 8) == reduce_scatter_bytes(96, 8) + all_gather_bytes(96, 8)


def test_tp_all_reduces_by_hand():
    stage = even_stages(TINY, 1)[0]
    size_v = 2 * 17 * 32 * 2  # b S W bytes of one vision all-reduce
    size_t = 2 * 16 * 32 * 2
    # t = 2: 2 (t-1)/t = 1, so each all-reduce sends its size; 4 per block, 2 blocks per tower
    per_micro = 4 * 2 * size_v + 4 * 2 * size_t
    (tr,) = tp_transfers(TINY, par(tp=2, dp=2), stage)
    assert tr.bytes == 3 * per_micro == 101376 and tr.calls == 3 * 4 * 4
    (ck,) = tp_transfers(TINY, par(tp=2, dp=2, activation_checkpointing=True), stage)
    assert ck.bytes == tr.bytes * 6 / 4
    assert tp_transfers(TINY, par(), stage) == []


def test_dp_by_zero_stage():
    n, d = 1000, 4
    total = lambda trs: sum(t.bytes for t in trs)  # noqa: E731
    grads = 2 * n  # bf16 bytes
    assert total(dp_transfers(n, par(zero_stage=0))) == 2 * 3 / 4 * grads  # all-reduce
    assert total(dp_transfers(n, par(zero_stage=1))) == 3 / 4 * grads + 3 / 4 * grads
    assert total(dp_transfers(n, par(zero_stage=2))) == 3 * (3 / 4 * grads) + 3 / 4 * grads
    assert total(dp_transfers(n, par(zero_stage=3))) == 3 * 3 * (3 / 4 * grads)
    # pipeline + bf16 at ZeRO-0 -> BF16_Optimizer: all-reduce grads, all-gather params
    assert total(dp_transfers(n, par(zero_stage=0, pp=2, dp=d))) == 1.5 * grads + 0.75 * grads
    # AMP DDP communicates fp32 gradients
    assert total(dp_transfers(n, par(zero_stage=0), grad_bytes=4)) == 1.5 * 4 * n
    assert dp_transfers(n, par(dp=1)) == []


def test_pp_and_loss_by_hand():
    packed = 2 * (17 * 32 + 16 * 32) * 2  # b (S_v W_v + S_t W_t) bf16 bytes = 4224
    (p2p,) = pp_transfers(TINY, par(pp=2, dp=2))
    assert p2p.bytes == 3 * 2 * packed
    p2p2, gather = pp_transfers(TINY, par(pp=2, dp=1, tp=2))
    assert p2p2.bytes == 3 * 2 * packed / 2 and gather.bytes == 3 * 2 * packed / 2
    assert pp_transfers(TINY, par()) == []
    n_global = 2 * 3 * 4
    ag, rs = loss_transfers(TINY, par())
    assert ag.bytes == rs.bytes == 3 / 4 * (2 * n_global * 32 * 4)


def test_placement():
    p = par(tp=2, dp=4, pp=2)
    assert placement("tp", p, 8).intra_node
    assert placement("dp", p, 8).intra_node  # ranks 0, 2, 4, 6
    pp = placement("pp", p, 8)
    assert not pp.intra_node and pp.members_per_node == 1
    big = placement("dp", par(dp=1024), 8)
    assert not big.intra_node and big.members_per_node == 8
    assert placement("dp", par(tp=8, dp=128), 8).members_per_node == 1


def test_devices_and_unknown_gpu():
    assert get_device("H100-80GB").tflops_16 == pytest.approx(989.4)
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb", "cpu"} <= set(DEVICES)
    with pytest.raises(Exception, match="valid: a100-40gb"):
        get_device("v100")


# ------------------------------------------------------------------ step time


def test_compute_term_by_hand_and_recompute_factor():
    """DP only, elementwise traffic made free: compute = 6 MACs N_local / (peak e sat)."""
    eff = Efficiency(matmul=0.5, memory=1e12)
    cl = Cluster(get_device("a100-40gb"), 4)
    p = par(zero_stage=1, micro_batch_size=64, grad_accum_steps=2)
    t = step_time(TINY, p, cl, eff)
    tokens = 64 * 17
    sat = tokens / (tokens + eff.gemm_half_tokens)
    macs = model_cost(TINY).macs_total
    expected = 6 * macs * 64 * 2 / (312e12 * 0.5 * sat)
    assert t.compute_s == pytest.approx(expected, rel=1e-6)
    t8 = step_time(TINY, replace(p, activation_checkpointing=True), cl, eff)
    assert t8.compute_s == pytest.approx(expected * 8 / 6, rel=1e-6)
    assert t.mfu == pytest.approx(t.samples_per_s_per_gpu * 6 * macs / 312e12)


def test_bubble_is_p_minus_1_over_m_plus_p_minus_1():
    cfg = load_preset("ViT-B-16")
    cl = Cluster(get_device("a100-80gb"), 32)
    p = ParallelConfig(tp=1, pp=4, dp=8, zero_stage=1, micro_batch_size=8, grad_accum_steps=12)
    t = step_time(cfg, p, cl, CALIBRATED)
    assert t.bubble_fraction == pytest.approx(3 / 15)
    pipe = t.compute_s + t.tp_s + t.pp_s + t.bubble_s
    assert t.bubble_s / pipe == pytest.approx(3 / 15)
    assert t.pp_s > 0 and t.total_s > pipe


def test_tp_adds_communication_and_replicated_work():
    cfg = load_preset("ViT-H-14")
    cl = Cluster(get_device("a100-40gb"), 64)
    base = dict(pp=1, zero_stage=1, activation_checkpointing=True, precision="bf16")
    t1 = step_time(cfg, ParallelConfig(tp=1, dp=64, micro_batch_size=32, **base), cl, CALIBRATED)
    t4 = step_time(cfg, ParallelConfig(tp=4, dp=16, micro_batch_size=128, **base), cl, CALIBRATED)
    assert t1.tp_s == 0 and t4.tp_s > 0
    assert t4.samples_per_s_per_gpu < t1.samples_per_s_per_gpu


# ------------------------------------------------------------------ calibration


def test_calibration_reproduces_the_published_runs():
    published_mfu = []
    for run in RUNS:
        pred = predict(run, CALIBRATED)
        assert abs(pred.samples_per_s_per_gpu / run.samples_per_s_per_gpu - 1) < BAND
        published_mfu.append(pred.mfu * run.samples_per_s_per_gpu / pred.samples_per_s_per_gpu)
    # the runs themselves: about 76 and 20.4 samples/s/GPU, about 13% and 21% MFU
    assert [round(r.samples_per_s_per_gpu, 1) for r in RUNS] == [75.6, 20.4]
    assert published_mfu[0] == pytest.approx(0.13, abs=0.01)
    assert published_mfu[1] == pytest.approx(0.21, abs=0.01)


def test_refit_gives_the_stored_constants():
    refit = fit()
    assert math.isclose(refit.matmul, CALIBRATED.matmul, rel_tol=0.01)
    assert math.isclose(refit.memory, CALIBRATED.memory, rel_tol=0.01)
    assert 0 < refit.matmul <= 1 and 0 < refit.memory <= 1
    assert 1 < cross_check_ratio() < 3.2  # H100 faster than A100, by less than the peak ratio


def test_stage_transfers_collects_every_class():
    from megaclip.perf.comm import stage_transfers

    p = par(tp=2, pp=2, dp=2, zero_stage=1)
    first, last = even_stages(TINY, 2)
    names_first = {t.name for t in stage_transfers(TINY, p, first, 18080)}
    names_last = {t.name for t in stage_transfers(TINY, p, last, 10913)}
    assert (
        "tp all-reduce (activations)" in names_first
        and "pp p2p (activations + grads)" in names_first
    )
    assert "dp reduce-scatter (grads)" in names_first
    assert "loss all-gather (features)" in names_last - names_first
