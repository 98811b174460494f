"""Benchmark formulas on hand-computed cases: TFLOPs/MFU/HFU, bubbles, analytic comm and memory.

The formulas live in megaclip.perf (throughput, comm accounting, model states, device table);
megaclip.bench counts what a real engine holds and compares.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from megaclip.bench.compare import compare_comm, summarize_comm
from megaclip.bench.memory import count_state
from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.model.flops import model_cost
from megaclip.perf.comm import Volume, comm_volume, packed_stage_bytes, tp_volume
from megaclip.perf.devices import datasheet_peak
from megaclip.perf.memory import default_stages, model_state_bytes, stage_params
from megaclip.perf.throughput import (
    analytic_bubble,
    hardware_flops_factor,
    measured_bubble,
    median,
    throughput,
)
from megaclip.train.metrics import probe_matmul


def rank_params(cfg, tp: int, pp: int = 1, stage: int = 0) -> int:
    """Parameters of one TP rank of pipeline stage ``stage`` out of ``pp``."""
    return stage_params(cfg, tp, default_stages(cfg, pp)[stage])


def test_throughput_hand_case():
    # 64 samples in 2 s on 4 devices, 1e9 MACs per sample, 100 TFLOP/s peak per device.
    t = throughput(64, 2.0, 4, 1e9, 100e12)
    assert t.samples_per_s == 32 and t.samples_per_s_per_device == 8
    assert t.model_tflops_per_device == pytest.approx(6 * 1e9 * 32 / 4 / 1e12)  # 0.048
    assert t.mfu == pytest.approx(0.048e12 / 100e12)
    assert t.hfu == t.mfu  # no recompute, no pipeline
    r = throughput(64, 2.0, 4, 1e9, 100e12, recompute=True)
    assert r.hfu == pytest.approx(t.mfu * 8 / 6) and r.mfu == t.mfu
    p = throughput(64, 2.0, 4, 1e9, 100e12, recompute=True, pp=2, schedule="recompute")
    assert p.hardware_tflops_per_device == pytest.approx(10 * 1e9 * 32 / 4 / 1e12)
    assert throughput(64, 2.0, 4, 1e9, None).mfu is None
    with pytest.raises(ValueError):
        throughput(64, 0.0, 4, 1e9, 1.0)


def test_flops_factors_and_bubbles():
    assert hardware_flops_factor(False, 1) == 6
    assert hardware_flops_factor(True, 1) == 8
    assert hardware_flops_factor(False, 4) == 6  # the global-loss schedule: one forward
    assert hardware_flops_factor(False, 4, "recompute") == 8
    assert analytic_bubble(2, 1) == 0.5
    assert analytic_bubble(2, 8) == pytest.approx(1 / 9)
    assert analytic_bubble(4, 4) == pytest.approx(3 / 7)
    assert measured_bubble(0.25, 1.0) == 0.25
    assert measured_bubble(2.0, 1.0) == 1.0
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_rank_params_partition_the_model():
    cfg = load_preset("tiny-pp")
    total = model_cost(cfg).params_total
    assert rank_params(cfg, 1) == total
    assert sum(rank_params(cfg, 1, 2, s) for s in range(2)) == total
    # TP=2 halves everything but 6W per block (2 biases + 2 LayerNorms) and the non-block params.
    w, blocks = 16, 8
    split_per_block = 4 * w * w + 3 * w + 2 * w * 32 + 32
    assert rank_params(cfg, 1) - rank_params(cfg, 2) == blocks * split_per_block // 2


def test_tp_and_pp_volume_hand_case():
    cfg = load_preset("tiny-pp")  # vision: 5 tokens x 16, text: 8 tokens x 16, 4 + 4 blocks
    par = ParallelConfig(tp=2, micro_batch_size=4, zero_stage=1)
    plan = default_stages(cfg, 1)[0]
    (v,) = tp_volume(cfg, par, plan)
    assert v.calls == 4 * 8  # 4 all-reduces per block, 8 blocks, 1 micro-batch
    assert v.payload_bytes == 4 * 4 * 4 * (4 * 5 * 16 + 4 * 8 * 16)  # k * b * a * sum(S W)
    assert v.sent_bytes == v.payload_bytes  # ring all-reduce over 2 ranks: 2 (1/2) S
    par = ParallelConfig(pp=2, micro_batch_size=2, grad_accum_steps=2)
    assert packed_stage_bytes(cfg, par) == 2 * (5 * 16 + 8 * 16) * 4
    first = {(x.cls, x.op): x for x in comm_volume(cfg, par, 0)}
    last = {(x.cls, x.op): x for x in comm_volume(cfg, par, 1)}
    p = packed_stage_bytes(cfg, par)
    assert first[("pp", "send")].payload_bytes == 2 * (p + 2 * 8)  # m x (activations + EOT ids)
    assert last[("pp", "send")].payload_bytes == 2 * p  # m gradients
    assert first[("pp", "recv")].payload_bytes == last[("pp", "send")].payload_bytes
    # the two-pass schedule sends the activations twice and runs 2 more TP all-reduces a block
    gc = replace(par, schedule="recompute")
    two = {(x.cls, x.op): x for x in comm_volume(cfg, gc, 0)}
    assert two[("pp", "send")].payload_bytes == 2 * 2 * (p + 2 * 8)
    tp_gc = replace(gc, tp=2)
    (one_pass,) = tp_volume(cfg, replace(tp_gc, schedule="keep"), plan)
    (two_pass,) = tp_volume(cfg, tp_gc, plan)
    assert two_pass.calls == one_pass.calls * 6 / 4


def test_dp_and_loss_volume_hand_case():
    cfg = load_preset("tiny-pp")
    n = model_cost(cfg).params_total
    for zero, want in ((0, 4 * n), (1, 8 * n), (2, 4 * n * 2 + 4 * n)):
        par = ParallelConfig(dp=2, zero_stage=zero, micro_batch_size=2, grad_accum_steps=2)
        vols = comm_volume(cfg, par, 0)
        dp_payload = sum(x.payload_bytes for x in vols if x.cls == "dp")
        assert dp_payload == want, zero
        (loss,) = [x for x in vols if x.cls == "loss"]
        assert loss.payload_bytes == 2 * 4 * 2 * 16 * 4 + 2 * (3 * 4 + 3) * 4
    par = ParallelConfig(dp=2, zero_stage=3, micro_batch_size=2, grad_accum_steps=2)
    vols = {(x.cls, x.op): x for x in comm_volume(cfg, par, 0)}
    # 3m gathers when m > 1: the feature pass, then each micro-batch's forward and backward
    assert vols[("dp", "all_gather")].payload_bytes == 3 * 2 * 4 * n
    assert vols[("dp", "reduce_scatter")].payload_bytes == 2 * 4 * n


def test_state_memory_hand_case():
    n = 1000
    z0 = model_state_bytes(n, ParallelConfig(dp=2, zero_stage=0))
    assert (z0.params, z0.grads, z0.optimizer, z0.model_states) == (4000, 4000, 8000, 16000)
    z1 = model_state_bytes(n, ParallelConfig(dp=4, zero_stage=1, precision="bf16"))
    assert (z1.params, z1.grads, z1.optimizer) == (2000, 500, 3000)
    z3 = model_state_bytes(n, ParallelConfig(dp=4, zero_stage=3, precision="bf16"))
    assert (z3.params, z3.grads, z3.optimizer) == (500, 500, 3000)


def test_count_state_plain_adamw():
    """Plain torch AdamW: params 4n, grads 4n, moments 8n (+ 4 bytes of step per tensor)."""
    net = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 3))
    n = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 10)).sum().backward()
    opt.step()
    net(torch.randn(2, 10)).sum().backward()
    c = count_state(net, opt)
    assert c.params == 4 * n and c.grads == 4 * n
    assert 8 * n <= c.optimizer <= 8 * n + 4 * 8 * len(list(net.parameters()))
    assert c.other == 0


def test_compare_and_summarize_comm():
    measured = [
        {"cls": "dp", "op": "all_reduce", "calls": 1, "payload_bytes": 102.0, "sent_bytes": 102.0},
        {"cls": "dp", "op": "broadcast", "calls": 3, "payload_bytes": 6.0, "sent_bytes": 3.0},
        {"cls": "self", "op": "all_reduce", "calls": 1, "payload_bytes": 50.0, "sent_bytes": 0.0},
    ]
    analytic = [Volume("dp", "all_reduce", 1, 100.0, 100.0), Volume("loss", "all_gather", 2, 8, 4)]
    rows = compare_comm(measured, analytic)
    assert {(r.cls, r.op) for r in rows} == {
        ("dp", "all_reduce"),
        ("dp", "broadcast"),
        ("loss", "all_gather"),
    }
    s = summarize_comm(rows)
    assert s.measured_payload == 102 and s.analytic_payload == 108
    assert s.unmodelled_payload == 6 and s.unmodelled_ops == ("dp:broadcast",)
    assert math.isclose(s.ratio, 102 / 108)


def test_peaks():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == pytest.approx(989.4e12)
    a100_fp32 = datasheet_peak("NVIDIA A100-SXM4-40GB", "fp32", tf32=False)
    assert a100_fp32 == (pytest.approx(19.5e12), "table:megaclip.perf:a100-40gb")
    assert datasheet_peak("NVIDIA A100-SXM4-40GB", "fp32", tf32=True)[0] == pytest.approx(156e12)
    assert datasheet_peak("cpu", "fp32") is None
    probe = probe_matmul("fp32", size=64, repeats=2)
    assert probe.flops > 0 and probe.source == "probe:fp32:64^3"


def test_cpu_probe_is_small_where_bf16_is_emulated(monkeypatch):
    """The start-up MFU probe and bench's cross probe use 512^3 for emulated bf16 (issue 25)."""
    from megaclip.train import metrics

    monkeypatch.setattr(metrics, "cpu_has_native_bf16", lambda: False)
    assert metrics.cpu_probe_size("bf16", 2048) == 512
    assert metrics.cpu_probe_size("bf16", 256) == 256
    assert metrics.cpu_probe_size("fp32", 2048) == 2048
    seen = []
    monkeypatch.setattr(metrics, "probe_matmul", lambda p, size, *a: seen.append(size))
    metrics.device_peak("bf16", torch.device("cpu"))
    metrics.device_peak("fp32", torch.device("cpu"))
    assert seen == [512, 2048]
    monkeypatch.setattr(metrics, "cpu_has_native_bf16", lambda: True)
    assert metrics.cpu_probe_size("bf16", 2048) == 2048
