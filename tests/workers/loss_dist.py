"""Worker: run every case of loss_common.CASES on 4 gloo processes; save results per rank.

Usage: torchrun --nproc_per_node 4 tests/workers/loss_dist.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megaclip.loss import clip_loss, siglip_loss
from megaclip.parallel.collectives import all_gather_cat, all_reduce_sum, stream_rows
from megaclip.parallel.runtime import clean_exit, init_distributed
from tests.workers.loss_common import (
    CASES,
    LAYOUTS,
    WORLD,
    collective_input,
    collective_weight,
    data_seed,
    features,
    group_of,
    make_problem,
)


def build_groups() -> dict[str, list]:
    """Every layout's groups; dist.new_group is collective, so all ranks create all of them."""
    groups = {"world": [dist.group.WORLD]}
    for name in ("pairs", "strided", "single"):
        groups[name] = [dist.new_group(ranks) for ranks in LAYOUTS[name]]
    return groups


def run_loss_case(index: int, case: dict, rank: int, group) -> dict:
    """Own slice of the group's batch through the toy towers, global loss, backward."""
    gi, ranks = group_of(case["layout"], rank)
    dp, pos, b = len(ranks), ranks.index(rank), case["b"]
    dtype = getattr(torch, case["dtype"])
    prob = make_problem(data_seed(index, case["layout"], gi), dp * b, case["d"])
    rows = slice(pos * b, (pos + 1) * b)
    w_img = prob["w_img"].to(dtype).requires_grad_()
    w_txt = prob["w_txt"].to(dtype).requires_grad_()
    scale = prob["logit_scale"].float().requires_grad_()
    bias = prob["logit_bias"].float().requires_grad_()
    img = features(prob["x_img"][rows].to(dtype), w_img)
    txt = features(prob["x_txt"][rows].to(dtype), w_txt)
    img.retain_grad()
    txt.retain_grad()
    out = {}
    if case["kind"] == "clip":
        res = clip_loss(
            img, txt, scale, dp_group=group, chunk_size=case["chunk"], mode=case["mode"]
        )
        loss = res.loss
        out.update(i2t=res.i2t_top1, t2i=res.t2i_top1)
    else:
        loss = siglip_loss(
            img, txt, scale, bias, dp_group=group, chunk_size=case["chunk"], mode=case["mode"]
        )
        out["bias_grad"] = None
    loss.backward()
    out.update(
        loss=loss.detach(),
        img_grad=img.grad,
        txt_grad=txt.grad,
        w_img_grad=w_img.grad,
        w_txt_grad=w_txt.grad,
        scale_grad=scale.grad,
        dp=dp,
        pos=pos,
        group_index=gi,
    )
    if case["kind"] == "siglip":
        out["bias_grad"] = bias.grad
    return out


def run_collectives_case(case: dict, rank: int, group) -> dict:
    """all_gather_cat / all_reduce_sum forward values and input gradients under per-rank weights."""
    _, ranks = group_of(case["layout"], rank)
    b, d = case["b"], case["d"]
    x = collective_input(rank, b, d).requires_grad_()
    y = all_gather_cat(x, group)
    (y * collective_weight(rank, len(ranks) * b, d)).sum().backward()
    gather_grad, x.grad = x.grad, None
    z = all_reduce_sum(x, group)
    (z * collective_weight(rank, b, d)).sum().backward()
    return {
        "gather": y.detach(),
        "gather_grad": gather_grad,
        "reduce": z.detach(),
        "reduce_grad": x.grad,
        "stream": [(j, block.clone()) for j, block in stream_rows(x, group)],
        "stream3": [(j, block.clone()) for j, block in stream_rows(x, group, per_step=3)],
    }


def main() -> None:
    out_dir = Path(sys.argv[1])
    rank, world = init_distributed()
    assert world == WORLD, world
    torch.manual_seed(0)
    groups = build_groups()
    results = {}
    for index, case in enumerate(CASES):
        gi, _ = group_of(case["layout"], rank)
        group = groups[case["layout"]][0 if case["layout"] == "world" else gi]
        if case["kind"] == "collectives":
            results[index] = run_collectives_case(case, rank, group)
        else:
            results[index] = run_loss_case(index, case, rank, group)
    torch.save(results, out_dir / f"rank{rank}.pt")
    clean_exit()


if __name__ == "__main__":
    main()
