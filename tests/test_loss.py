"""Single-process checks of megaclip.loss: chunking, float64 reference, open_clip, bf16, errors.

Tolerances: float32 vs float64 reference 1e-6 abs + 1e-5 rel; chunked vs unchunked float32
1e-6 abs + 1e-5 rel; bf16 inputs vs float32: loss 2e-2 abs, gradients 2e-2 abs + 5e-2 rel.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megaclip.errors import ConfigError
from megaclip.loss import ContrastiveLoss, SigLipLoss, clip_loss, siglip_loss


def batch(n: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return img.to(dtype), txt.to(dtype)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def ref_clip(img, txt, logit_scale):
    logits = logit_scale.exp() * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def ref_siglip(img, txt, logit_scale, logit_bias):
    logits = logit_scale.exp() * img @ txt.T + logit_bias
    sign = 2 * torch.eye(img.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(sign * logits).sum() / img.shape[0]


def ours(kind, img, txt, scale, bias, chunk):
    if kind == "clip":
        return clip_loss(img, txt, scale, chunk_size=chunk).loss
    return siglip_loss(img, txt, scale, bias, chunk_size=chunk)


def value_and_grads(kind, fn, img, txt, scale, bias):
    args = leaves(img, txt, scale, bias)
    loss = fn(kind, *args)
    return loss.detach(), torch.autograd.grad(loss, args if kind == "siglip" else args[:3])


def ours_fn(chunk):
    return lambda kind, i, t, s, b: ours(kind, i, t, s, b, chunk)


def ref_fn(kind, i, t, s, b):
    return ref_clip(i, t, s) if kind == "clip" else ref_siglip(i, t, s, b)


SCALE = torch.tensor([math.log(1 / 0.07)])
BIAS = torch.tensor([-3.0])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 10, 11, 64, None])
def test_chunked_equals_unchunked_and_reference(kind: str, chunk) -> None:
    img, txt = batch(11, 8)
    loss, grads = value_and_grads(kind, ours_fn(chunk), img, txt, SCALE, BIAS)
    loss_full, grads_full = value_and_grads(kind, ours_fn(None), img, txt, SCALE, BIAS)
    torch.testing.assert_close(loss, loss_full, atol=1e-6, rtol=1e-5)
    for g, gf in zip(grads, grads_full):
        torch.testing.assert_close(g, gf, atol=1e-6, rtol=1e-5)
    d64 = [t.double() for t in (img, txt, SCALE, BIAS)]
    loss_ref, grads_ref = value_and_grads(kind, ref_fn, *d64)
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-6, rtol=1e-5)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), gr, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcheck_float64(kind: str) -> None:
    img, txt = batch(5, 4, seed=3, dtype=torch.float64)
    args = leaves(img, txt, SCALE.double(), BIAS.double())

    def f(i, t, s, b):
        return ours(kind, i, t, s, b, 2)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    d=st.integers(1, 6),
    chunk=st.one_of(st.none(), st.integers(1, 10)),
    log_scale=st.floats(-2.0, 5.0),
    bias=st.floats(-12.0, 3.0),
    seed=st.integers(0, 1000),
)
def test_property_matches_reference(n, d, chunk, log_scale, bias, seed) -> None:
    img, txt = batch(n, d, seed=seed, dtype=torch.float64)
    s, b = torch.tensor([log_scale], dtype=torch.float64), torch.tensor([bias], dtype=torch.float64)
    for kind in ("clip", "siglip"):
        loss, grads = value_and_grads(kind, ours_fn(chunk), img, txt, s, b)
        loss_ref, grads_ref = value_and_grads(kind, ref_fn, img, txt, s, b)
        torch.testing.assert_close(loss, loss_ref, atol=1e-10, rtol=1e-10)
        for g, gr in zip(grads, grads_ref):
            torch.testing.assert_close(g, gr, atol=1e-10, rtol=1e-9)


def test_large_scale_is_stable() -> None:
    """scale 100 with near-duplicate rows: no overflow in the online log-sum-exp."""
    img, txt = batch(9, 4, seed=5)
    txt = F.normalize(img + 1e-3 * txt, dim=1)
    s = torch.tensor([math.log(100.0)])
    for kind in ("clip", "siglip"):
        loss, grads = value_and_grads(kind, ours_fn(4), img, txt, s, torch.tensor([-10.0]))
        loss_ref, grads_ref = value_and_grads(
            kind, ref_fn, img.double(), txt.double(), s.double(), torch.tensor([-10.0]).double()
        )
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
        for g, gr in zip(grads, grads_ref):
            torch.testing.assert_close(g.double(), gr, atol=1e-5, rtol=1e-5)


def test_matches_open_clip_clip_loss() -> None:
    """open_clip's ClipLoss takes exp(logit_scale); ours takes the log parameter itself."""
    from open_clip.loss import ClipLoss

    img, txt = batch(10, 16, seed=1)
    a = leaves(img, txt, SCALE)
    b = leaves(img, txt, SCALE)
    out = ContrastiveLoss(chunk_size=3)(a[0], a[1], a[2])
    theirs = ClipLoss(world_size=1)(b[0], b[1], b[2].exp())
    out.loss.backward()
    theirs.backward()
    torch.testing.assert_close(out.loss, theirs, atol=1e-6, rtol=1e-5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


def test_matches_open_clip_siglip_loss() -> None:
    from open_clip.loss import SigLipLoss as OpenClipSigLip

    img, txt = batch(10, 16, seed=2)
    a = leaves(img, txt, SCALE, BIAS)
    b = leaves(img, txt, SCALE, BIAS)
    loss = SigLipLoss(chunk_size=4)(*a)
    theirs = OpenClipSigLip(world_size=1)(b[0], b[1], b[2].exp(), b[3])
    loss.backward()
    theirs.backward()
    torch.testing.assert_close(loss, theirs, atol=1e-6, rtol=1e-5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


def test_accuracy_metrics() -> None:
    img, txt = batch(12, 3, seed=4)
    out = clip_loss(img, txt, SCALE, chunk_size=5)
    logits = img @ txt.T
    labels = torch.arange(12)
    assert out.i2t_top1.item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert out.t2i_top1.item() == pytest.approx((logits.argmax(0) == labels).float().mean().item())
    assert not out.i2t_top1.requires_grad
    assert 0.0 < out.i2t_top1.item() < 1.0  # the batch is neither trivial nor hopeless


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bf16_inputs_close_to_fp32(kind: str) -> None:
    img, txt = batch(24, 32, seed=6)
    loss32, grads32 = value_and_grads(kind, ours_fn(7), img, txt, SCALE, BIAS)
    loss16, grads16 = value_and_grads(kind, ours_fn(7), img.bfloat16(), txt.bfloat16(), SCALE, BIAS)
    assert loss16.dtype == torch.float32
    assert grads16[0].dtype == torch.bfloat16
    torch.testing.assert_close(loss16, loss32, atol=2e-2, rtol=0)
    for g16, g32 in zip(grads16, grads32):
        torch.testing.assert_close(g16.float(), g32, atol=2e-2, rtol=5e-2)


def test_bad_arguments() -> None:
    img, txt = batch(4, 3)
    with pytest.raises(ConfigError, match="chunk_size"):
        ContrastiveLoss(chunk_size=0)
    with pytest.raises(ConfigError, match="chunk_size"):
        clip_loss(img, txt, SCALE, chunk_size=2.5)
    with pytest.raises(ConfigError, match="mode"):
        SigLipLoss(mode="ring")
    with pytest.raises(ValueError, match=r"\[b, d\]"):
        clip_loss(img, txt[:3], SCALE)
    with pytest.raises(ValueError, match="one element"):
        siglip_loss(img, txt, SCALE, torch.zeros(2))
    with pytest.raises(ValueError, match="dtype"):
        clip_loss(img, txt.double(), SCALE)


@pytest.mark.parametrize("spread", ["unit", "wide"])
def test_backward_matches_float64_when_the_log_sum_exps_spread_widely(spread: str) -> None:
    """Unnormalised rows at scale 100 spread the 2N log-sum-exps over hundreds: the backward's
    two softmaxes (row P and column Q, each exp'd with its own shift) stay exact."""
    img, txt = batch(40, 6, seed=7)
    s = SCALE
    if spread == "wide":
        norms = torch.linspace(0.2, 1.5, 40)[:, None]
        img, txt, s = img * norms, txt * norms.flip(0), torch.tensor([math.log(100.0)])
    loss, grads = value_and_grads("clip", ours_fn(7), img, txt, s, BIAS)
    loss_ref, grads_ref = value_and_grads(
        "clip", ref_fn, *(t.double() for t in (img, txt, s, BIAS))
    )
    torch.testing.assert_close(loss.double(), loss_ref, atol=1e-5, rtol=1e-5)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), gr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("tile", [1, 6, 20])
def test_row_blocks_smaller_than_the_chunk(monkeypatch, kind: str, tile: int) -> None:
    """CPU row blocks of CPU_TILE / width rows (here 1, 1 and 4 rows of 5 columns) change
    nothing but the rounding."""
    import megaclip.loss.common as common

    img, txt = batch(11, 8)
    want, want_grads = value_and_grads(kind, ours_fn(None), img, txt, SCALE, BIAS)
    monkeypatch.setattr(common, "CPU_TILE", tile)
    loss, grads = value_and_grads(kind, ours_fn(5), img, txt, SCALE, BIAS)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for g, gw in zip(grads, want_grads):
        torch.testing.assert_close(g, gw, atol=1e-6, rtol=1e-5)
