"""The collective-counting shim counts a known all-reduce, all-gather and send/recv exactly."""

from __future__ import annotations

import pytest
import torch

from megaclip.bench.comm import CommRecord, classify, totals
from megaclip.perf.comm import sent_bytes
from tests.mp_util import torchrun


@pytest.mark.multiproc
def test_shim_counts_known_collectives(tmp_path):
    torchrun(2, "tests/workers/bench_comm_shim.py", tmp_path, timeout=120)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        # The collectives still compute the right values through the wrappers.
        assert torch.equal(out["reduced"], torch.full((3, 5), 3.0))
        assert torch.equal(
            out["gathered"], torch.tensor([0.0] * 7 + [1.0] * 7, dtype=torch.float64)
        )
        assert torch.equal(out["before"], torch.full((4,), 2.0))
        recs = out["records"]
        assert [r["op"] for r in recs] == [
            "all_reduce",
            "all_gather",
            "send" if rank == 0 else "recv",
        ]
        ar, ag, p2p = recs
        assert ar["payload_bytes"] == 60 and ar["sent_bytes"] == 60.0  # 2 (n-1)/n * 60, n = 2
        assert tuple(ar["ranks"]) == (0, 1) and ar["dtype"] == "float32" and ar["phase"] == "step"
        assert ag["payload_bytes"] == 14 * 8 and ag["sent_bytes"] == 56.0  # (n-1)/n * output
        assert ag["phase"] == "loss" and ag["name"] == "all_gather_into_tensor"
        assert p2p["payload_bytes"] == 48 and tuple(p2p["ranks"]) == (0, 1)
        assert p2p["sent_bytes"] == (48.0 if rank == 0 else 0.0)


def _rec(op, ranks, payload, phase="step"):
    return CommRecord(
        op, op, tuple(ranks), "float32", payload, sent_bytes(op, payload, len(ranks)), 0.1, phase
    )


def test_classify_by_group_membership_and_phase():
    groups = {"tp": [2, 3], "dp": [1, 3], "pp": [3, 7]}
    assert classify(_rec("all_reduce", [2, 3], 8), groups) == "tp"
    assert classify(_rec("all_gather", [1, 3], 8), groups) == "dp"
    assert classify(_rec("all_gather", [1, 3], 8, phase="loss"), groups) == "loss"
    assert classify(_rec("send", [3, 7], 8), groups) == "pp"
    assert classify(_rec("all_reduce", [0, 1, 2, 3], 8), groups) == "other:4"
    assert classify(_rec("all_reduce", [3], 8), groups) == "self"
    # Equal memberships (dp = 1 makes the world the TP group): the non-trivial axis wins.
    assert classify(_rec("all_reduce", [0, 1], 8), {"tp": [0, 1], "dp": [1], "pp": [1]}) == "tp"


def test_totals_per_step_and_sent_bytes():
    groups = {"tp": [0, 1], "dp": [0], "pp": [0]}
    recs = [_rec("all_reduce", [0, 1], 100)] * 4 + [_rec("all_gather", [0, 1], 40)] * 2
    rows = {(t.cls, t.op): t for t in totals(recs, groups, steps=2)}
    assert rows[("tp", "all_reduce")].calls == 2 and rows[("tp", "all_reduce")].payload_bytes == 200
    assert rows[("tp", "all_reduce")].sent_bytes == 200  # 2 (2-1)/2 * 200
    assert rows[("tp", "all_gather")].sent_bytes == 20
    assert sent_bytes("all_reduce", 80, 4) == 120
    assert sent_bytes("reduce_scatter", 80, 4) == 60
    assert sent_bytes("recv", 80, 2) == 0
    assert sent_bytes("all_reduce", 80, 1) == 0
