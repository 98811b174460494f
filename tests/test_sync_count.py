"""A training step makes a bounded number of host synchronisations, whatever its size.

Every conversion of a tensor to a Python value (``.item()``, ``.tolist()``, ``bool()``,
``float()``, ...) waits for the accelerator. tests/workers/sync_count.py counts them inside
``ClipEngine.train_step`` (DeepSpeed's included) on one process; here the count must not depend
on the number of micro-batches (accum 1 vs 8) or of parameters (two model sizes), must stay a
small constant per ZeRO stage and precision, and megaclip's own share at most three: the fused
non-finite check (ZeRO-0), the fused scan that replaces DeepSpeed's per-tensor one (fp16/bf16
ZeRO-0) and the one read of the step's metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megaclip.train.optim import fuse_overflow_check, non_finite_flag
from tests.mp_util import REPO

MODELS = ("tiny", "tiny-pp")  # 62 and 110 parameter tensors
ACCUMS = (1, 8)
CONFIGS = [  # (zero stage, precision)
    (0, "fp32"),  # megaclip's GuardedAdamW: one fused check
    (1, "fp32"),
    (0, "bf16"),  # DeepSpeed's bf16 wrapper, with its overflow scan fused by megaclip
    (3, "bf16"),
]
MAX_PER_STEP = 8  # what DeepSpeed adds: overflow flags, grad-norm checks (constant)
MAX_MEGACLIP = 3  # non-finite flag (ZeRO-0), fused DeepSpeed scan (bf16 ZeRO-0), metrics read


@pytest.fixture(scope="module")
def counts():
    cases = [
        {"model": m, "zero": z, "accum": a, "precision": p, "micro": 2}
        for z, p in CONFIGS
        for m in MODELS
        for a in ACCUMS
    ]
    cases.append({"model": "tiny", "zero": 0, "accum": 2, "precision": "fp32", "nan": True})
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "tests/workers/sync_count.py", json.dumps({"cases": cases, "steps": 2})],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("SYNC_COUNTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1].split(" ", 1)[1])


@pytest.mark.parametrize("zero, precision", CONFIGS, ids=[f"zero{z}-{p}" for z, p in CONFIGS])
def test_sync_count_is_independent_of_accum_and_model_size(counts, zero, precision):
    rows = [
        r for r in counts if r["zero"] == zero and r["precision"] == precision and not r.get("nan")
    ]
    assert len(rows) == len(MODELS) * len(ACCUMS)
    assert len({r["params"] for r in rows}) == len(MODELS)  # two genuinely different sizes
    totals = {(r["model"], r["accum"]): r["totals"] for r in rows}
    every = {n for t in totals.values() for n in t}
    assert len(every) == 1, totals  # the same count in every case and every step
    assert every.pop() <= MAX_PER_STEP, totals
    assert max(n for r in rows for n in r["megaclip"]) <= MAX_MEGACLIP, rows


def test_zero0_fp32_step_reads_the_device_twice_skipped_or_not(counts):
    """GuardedAdamW: one fused non-finite flag; the engine: one read of every metric."""
    plain = [r for r in counts if r["zero"] == 0 and r["precision"] == "fp32" and not r.get("nan")]
    assert {n for r in plain for n in r["totals"]} == {2}
    skipped = next(r for r in counts if r.get("nan"))
    assert skipped["skipped_last"] is True  # the NaN step was skipped...
    assert skipped["totals"][-1] == 2  # ...at the same cost


@pytest.mark.parametrize(
    "bad, want",
    [(None, 0.0), (float("nan"), 1.0), (float("inf"), 1.0), (-float("inf"), 1.0), (6e4, 0.0)],
)
def test_non_finite_flag(bad, want):
    grads = [torch.randn(3, 4), torch.randn(5).bfloat16(), torch.full((4,), 6e4).half()]
    if bad is not None:
        grads[1][2] = bad
    flag = non_finite_flag(grads)
    assert flag.shape == () and flag.dtype == torch.float32 and flag.item() == want
    assert non_finite_flag([]).item() == 0.0


def test_fused_overflow_check_replaces_the_per_tensor_scan():
    class Checker:
        def has_overflow_serial(self, params):  # DeepSpeed's: one host read per tensor
            raise AssertionError("the serial scan ran")

    class Param:
        def __init__(self, value):
            self.grad = torch.tensor(value)

    opt = type("Wrapper", (), {"overflow_checker": Checker()})()
    assert fuse_overflow_check(opt)
    scan = opt.overflow_checker.has_overflow_serial
    assert scan([Param([1.0, 2.0]), Param([3.0])]) is False
    assert scan([Param([1.0, float("nan")])]) is True
    assert not fuse_overflow_check(object())  # ZeRO optimizers without it: untouched
