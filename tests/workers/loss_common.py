"""Cases and data shared by tests/workers/loss_dist.py and tests/test_loss_dist.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

WORLD = 4

# name -> list of DP groups (global ranks, in DP-index order) of a 4-process world.
LAYOUTS: dict[str, list[list[int]]] = {
    "world": [[0, 1, 2, 3]],  # DP=4 (the WORLD group object itself)
    "pairs": [[0, 1], [2, 3]],  # DP=2, PP=2-like: two independent DP groups
    "strided": [[0, 2], [1, 3]],  # DP=2 under TP=2: global rank != DP index
    "single": [[0], [1], [2], [3]],  # DP=1 groups of size 1
}

# Each case: kind (clip | siglip | collectives), layout, b rows per rank, d, chunk, dtype, mode.
_LOSS = [
    ("world", 5, "float32"),
    ("world", None, "float32"),
    ("world", 7, "float32"),  # stream: 2 owner blocks (6 columns) per step
    ("world", 9, "float32"),  # stream: 3 blocks, then the last one alone
    ("pairs", 4, "float32"),
    ("strided", 5, "float32"),
    ("strided", 2, "float32"),
    ("single", 2, "float32"),
    ("strided", 4, "bfloat16"),
]
CASES: list[dict] = [
    {"kind": kind, "layout": layout, "b": 3, "d": 8, "chunk": chunk, "dtype": dtype, "mode": mode}
    for kind in ("clip", "siglip")
    for mode in ("allgather", "stream")
    for layout, chunk, dtype in _LOSS
] + [
    {"kind": "collectives", "layout": layout, "b": 2, "d": 3, "chunk": None, "dtype": "float32"}
    for layout in ("strided", "world", "single")
]

D_IN = 6


def group_of(layout: str, rank: int) -> tuple[int, list[int]]:
    """(index of the DP group holding ``rank``, its ranks) in ``layout``."""
    for gi, ranks in enumerate(LAYOUTS[layout]):
        if rank in ranks:
            return gi, ranks
    raise AssertionError(f"rank {rank} not in layout {layout}")


def data_seed(case_index: int, layout: str, group_index: int) -> int:
    """Seed of one DP group's global batch; TP replicas ('strided' groups) share their data."""
    return 1000 * case_index + (0 if layout == "strided" else group_index)


def make_problem(seed: int, n: int, d: int) -> dict[str, torch.Tensor]:
    """A float64 global batch: raw inputs, two linear towers, logit_scale and logit_bias."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x_img": torch.randn(n, D_IN, generator=g, dtype=torch.float64),
        "x_txt": torch.randn(n, D_IN, generator=g, dtype=torch.float64),
        "w_img": torch.randn(D_IN, d, generator=g, dtype=torch.float64),
        "w_txt": torch.randn(D_IN, d, generator=g, dtype=torch.float64),
        "logit_scale": torch.tensor([2.3], dtype=torch.float64),
        "logit_bias": torch.tensor([-2.0], dtype=torch.float64),
    }


def features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The toy tower: L2-normalised x @ w."""
    return F.normalize(x @ w, dim=-1)


def collective_weight(global_rank: int, rows: int, d: int) -> torch.Tensor:
    """Per-rank upstream gradient used by the collectives case."""
    g = torch.Generator().manual_seed(77 + global_rank)
    return torch.randn(rows, d, generator=g)


def collective_input(global_rank: int, b: int, d: int) -> torch.Tensor:
    """Per-rank input of the collectives case (distinct per global rank)."""
    return torch.arange(b * d, dtype=torch.float32).reshape(b, d) + 100.0 * global_rank
