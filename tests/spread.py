"""How much of each exactness bound a run uses, for the tolerance sweep (issue 25).

With ``MEGACLIP_SPREAD_LOG=FILE`` set, every ``torch.testing.assert_close`` of the suite and every
``record`` call append one JSON line: the test, the check, and ``used`` = measured / allowed (a
check passes at ``used <= 1``). ``benchmarks/tolerance_spread.py`` runs the exactness tests under
several kernel families and thread counts and reports the largest ``used`` of each check, so each
bound's margin over the measured spread is a printed figure, not a guess. Unset, nothing is
written and ``assert_close`` is untouched.
"""

from __future__ import annotations

import json
import math
import os

import torch

_ENV = "MEGACLIP_SPREAD_LOG"
# torch.testing.assert_close's defaults when a call gives no tolerance: (rtol, atol) by dtype
_DEFAULTS = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def enabled() -> bool:
    return bool(os.environ.get(_ENV))


def _test_id() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]


def record(check: str, measured: float, allowed: float) -> None:
    """Append ``measured / allowed`` of one check of the running test (no-op unless enabled)."""
    if not enabled():
        return
    if allowed > 0:
        used = float(measured) / float(allowed)
    else:
        used = 0.0 if float(measured) == 0 else math.inf
    line = {"test": _test_id(), "check": check, "used": used}
    with open(os.environ[_ENV], "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _used(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    diff = (actual.double() - expected.double()).abs()
    allowed = atol + rtol * expected.double().abs()
    if diff.numel() == 0:
        return 0.0
    exact = allowed == 0
    if bool(exact.any()):
        if bool((diff[exact] > 0).any()):
            return math.inf
        diff, allowed = diff[~exact], allowed[~exact]
        if diff.numel() == 0:
            return 0.0
    return float((diff / allowed).max())


def install() -> None:
    """Wrap ``torch.testing.assert_close`` so every tensor comparison is recorded, then checked."""
    if not enabled() or getattr(torch.testing.assert_close, "_spread", False):
        return
    original = torch.testing.assert_close

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kwargs):
        tensors = isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)
        if not args and tensors and actual.is_floating_point() and actual.shape == expected.shape:
            d_rtol, d_atol = _DEFAULTS.get(actual.dtype, (0.0, 0.0))
            r = d_rtol if rtol is None else rtol
            a = d_atol if atol is None else atol
            record("assert_close", _used(actual, expected, r, a), 1.0)
        return original(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)

    assert_close._spread = True
    torch.testing.assert_close = assert_close
