"""Real 4-process gloo runs of the global-batch losses against a float64 single-process reference.

One torchrun launch runs every case of tests/workers/loss_common.CASES (DP=4 over WORLD, two DP=2
groups {0,1},{2,3}, the TP=2 layout's DP groups {0,2},{1,3}, and DP=1 groups).
Checked: the loss on every rank equals the full-batch loss; each rank's feature gradient equals
dp * dL/d(its features); and the DP average of every parameter gradient (toy towers, logit_scale,
logit_bias) equals the single-process gradient.
Tolerances: float32 1e-6 abs + 1e-5 rel; bfloat16 3e-2 abs + 3e-2 rel (bf16 features carry
8 mantissa bits).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.mp_util import REPO, torchrun
from tests.workers import loss_common as common

pytestmark = pytest.mark.multiproc

TOL = {"float32": (1e-6, 1e-5), "bfloat16": (3e-2, 3e-2)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("loss_dist")
    torchrun(common.WORLD, REPO / "tests/workers/loss_dist.py", out, timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(common.WORLD)]


def reference(kind: str, prob: dict) -> dict:
    """Plain float64 autograd over the full N x N logits (independent of megaclip.loss)."""
    p = {k: v.clone().requires_grad_(k.startswith(("w_", "logit"))) for k, v in prob.items()}
    img, txt = common.features(p["x_img"], p["w_img"]), common.features(p["x_txt"], p["w_txt"])
    img.retain_grad()
    txt.retain_grad()
    logits = p["logit_scale"].exp() * img @ txt.T
    n = logits.shape[0]
    if kind == "clip":
        labels = torch.arange(n)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        sign = 2 * torch.eye(n, dtype=logits.dtype) - 1
        loss = -F.logsigmoid(sign * (logits + p["logit_bias"])).sum() / n
    loss.backward()
    return {
        "loss": loss.detach(),
        "img_grad": img.grad,
        "txt_grad": txt.grad,
        "w_img_grad": p["w_img"].grad,
        "w_txt_grad": p["w_txt"].grad,
        "scale_grad": p["logit_scale"].grad,
        "bias_grad": p["logit_bias"].grad if kind == "siglip" else None,
        "i2t": (logits.argmax(1) == torch.arange(n)).double().mean(),
        "t2i": (logits.argmax(0) == torch.arange(n)).double().mean(),
    }


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: str, what: str) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


LOSS_CASES = [(i, c) for i, c in enumerate(common.CASES) if c["kind"] != "collectives"]


@pytest.mark.parametrize(
    "index,case",
    LOSS_CASES,
    ids=[
        f"{c['kind']}-{c['mode']}-{c['layout']}-chunk{c['chunk']}-{c['dtype']}"
        for _, c in LOSS_CASES
    ],
)
def test_matches_single_process(results, index: int, case: dict) -> None:
    dtype, b = case["dtype"], case["b"]
    for gi, ranks in enumerate(common.LAYOUTS[case["layout"]]):
        dp = len(ranks)
        ref = reference(
            case["kind"],
            common.make_problem(common.data_seed(index, case["layout"], gi), dp * b, case["d"]),
        )
        outs = [results[r][index] for r in ranks]
        assert [o["pos"] for o in outs] == list(range(dp))
        for o in outs:
            close(o["loss"], ref["loss"], dtype, f"loss rank{ranks[o['pos']]}")
            rows = slice(o["pos"] * b, (o["pos"] + 1) * b)
            close(o["img_grad"] / dp, ref["img_grad"][rows], dtype, "image feature grad / dp")
            close(o["txt_grad"] / dp, ref["txt_grad"][rows], dtype, "text feature grad / dp")
        # The convention under test: DP-averaged parameter gradients == single-process gradients.
        names = ["w_img_grad", "w_txt_grad", "scale_grad"]
        names += ["bias_grad"] if case["kind"] == "siglip" else []
        for name in names:
            mean = torch.stack([o[name].double() for o in outs]).mean(0)
            close(mean, ref[name], dtype, f"DP mean of {name}")
        if case["kind"] == "clip" and dtype == "float32":
            for o in outs:
                assert o["i2t"].item() == pytest.approx(ref["i2t"].item())
                assert o["t2i"].item() == pytest.approx(ref["t2i"].item())


def test_rank_values_identical(results) -> None:
    """The returned loss is bit-identical on every rank of a DP group."""
    for index, case in LOSS_CASES:
        for ranks in common.LAYOUTS[case["layout"]]:
            values = {results[r][index]["loss"].item() for r in ranks}
            assert len(values) == 1, (case, values)


COLL_CASES = [(i, c) for i, c in enumerate(common.CASES) if c["kind"] == "collectives"]


@pytest.mark.parametrize("index,case", COLL_CASES, ids=[c["layout"] for _, c in COLL_CASES])
def test_collectives_on_subgroups(results, index: int, case: dict) -> None:
    """all_gather_cat: y = cat_r x_r, dx_r = sum_r' w_r'[rows r]; all_reduce_sum: sum_r' w_r';
    stream_rows: (j, x_j) in group order."""
    b, d = case["b"], case["d"]
    for ranks in common.LAYOUTS[case["layout"]]:
        dp = len(ranks)
        gathered = torch.cat([common.collective_input(r, b, d) for r in ranks])
        w_gather = sum(common.collective_weight(r, dp * b, d) for r in ranks)
        w_reduce = sum(common.collective_weight(r, b, d) for r in ranks)
        for pos, r in enumerate(ranks):
            out = results[r][index]
            torch.testing.assert_close(out["gather"], gathered, atol=0, rtol=0)
            torch.testing.assert_close(out["gather_grad"], w_gather[pos * b : (pos + 1) * b])
            torch.testing.assert_close(
                out["reduce"], sum(common.collective_input(q, b, d) for q in ranks)
            )
            torch.testing.assert_close(out["reduce_grad"], w_reduce)
            assert [j for j, _ in out["stream"]] == list(range(dp))
            for j, block in out["stream"]:
                torch.testing.assert_close(
                    block, common.collective_input(ranks[j], b, d), atol=0, rtol=0
                )
            assert [j for j, _ in out["stream3"]] == list(range(0, dp, 3))
            for j, block in out["stream3"]:
                torch.testing.assert_close(block, gathered[j * b : (j + 3) * b], atol=0, rtol=0)
