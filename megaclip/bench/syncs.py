"""Count the conversions of tensors to Python values (host reads) inside a block of code.

Every ``.item()``, ``.tolist()``, ``.numpy()``, ``bool()``, ``float()``, ``int()`` or
``__index__`` of a tensor waits for the accelerator: the count bounds the host synchronisations
of, e.g., one training step. Used by tests/test_sync_count.py and benchmarks/gpu_check.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Iterator

import torch

CONVERSIONS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
_PACKAGE = os.sep + "megaclip" + os.sep  # frames of megaclip's own code


@contextlib.contextmanager
def counting_host_reads() -> Iterator[Counter]:
    """Patch torch.Tensor's conversions with counters: {kind: n, "megaclip": n of megaclip's}."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def wrap(name, fn):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            if _PACKAGE in sys._getframe(1).f_code.co_filename:
                counts["megaclip"] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def total(counts: Counter) -> int:
    """All conversions counted (megaclip's share is included once)."""
    return sum(v for k, v in counts.items() if k != "megaclip")
