"""Image <-> text retrieval recall@K over (image, caption) pairs.

Image -> text: for image i, the positives are its captions; it is a hit at K when the best-scoring
positive is ranked within the top K texts. Text -> image: caption j's positive is its own image.
Exact ties (identical captions or images give identical features) are broken at random, in
expectation: a positive tied with ``e`` negatives below ``g`` better ones is a hit at K with
probability clamp((K - g) / (e + 1), 0, 1). A collapsed model whose features are all equal thus
scores chance level (K / candidates), neither 0 nor 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch

from megaclip.errors import DataError
from megaclip.eval.zeroshot import check_finite, input_dtype

Tokenizer = Callable[[list[str]], torch.Tensor]
DEFAULT_KS = (1, 5, 10)


class RankCounts(NamedTuple):
    """Per query: negatives scoring strictly above the positive, and negatives tied with it."""

    greater: torch.Tensor  # [Q] int64
    ties: torch.Tensor  # [Q] int64

    def recall(self, k: int) -> float:
        """Expected recall@k, ties broken at random: mean of clamp((k - greater) / (ties + 1))."""
        hit = ((k - self.greater).float() / (self.ties + 1).float()).clamp(0.0, 1.0)
        return float(hit.mean()) if len(hit) else 0.0


def positive_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[RankCounts, RankCounts]:
    """(image->text, text->image) rank counts of each query's best positive.

    S = image_features @ text_features.T ([N, M], computed ``chunk_size`` query rows at a time).
    Image i: s* = max over its captions p of S[i, p]; greater = #{negative texts j: S[i, j] > s*},
    ties = #{negative j: S[i, j] == s*}. Text j with image g = ``text_to_image[j]`` (default:
    identity, one caption per image): the same against S[g, j] over the other images.
    """
    n, m = image_features.shape[0], text_features.shape[0]
    device = image_features.device
    if text_to_image is None:
        if n != m:
            raise DataError(f"{n} images but {m} texts: pass text_to_image to pair them")
        text_to_image = torch.arange(n, device=device)
    text_to_image = text_to_image.to(device)
    if text_to_image.shape != (m,):
        raise DataError(f"text_to_image must have shape ({m},), got {tuple(text_to_image.shape)}")
    if m and (text_to_image.min() < 0 or text_to_image.max() >= n):
        raise DataError(f"text_to_image holds an image index outside [0, {n})")
    captioned = torch.zeros(n, dtype=torch.bool, device=device)
    captioned[text_to_image] = True
    if not bool(captioned.all()):
        first = int((~captioned).nonzero()[0, 0])
        raise DataError(f"image {first} has no caption: every image needs at least one")
    if chunk_size < 1:
        raise DataError(f"chunk_size={chunk_size} must be >= 1")

    i2t = RankCounts(torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long))
    for a in range(0, n, chunk_size):
        sims = image_features[a : a + chunk_size] @ text_features.T  # [c, M]
        rows = torch.arange(a, a + sims.shape[0], device=device)
        neg = text_to_image.unsqueeze(0) != rows.unsqueeze(1)  # [c, M]
        best = sims.masked_fill(neg, float("-inf")).amax(dim=1, keepdim=True)  # [c, 1]
        i2t.greater[a : a + len(rows)] = ((sims > best) & neg).sum(dim=1).cpu()
        i2t.ties[a : a + len(rows)] = ((sims == best) & neg).sum(dim=1).cpu()
    t2i = RankCounts(torch.empty(m, dtype=torch.long), torch.empty(m, dtype=torch.long))
    for a in range(0, m, chunk_size):
        sims = text_features[a : a + chunk_size] @ image_features.T  # [c, N]
        own = text_to_image[a : a + chunk_size].unsqueeze(1)  # [c, 1]
        score = sims.gather(1, own)  # [c, 1]
        t2i.greater[a : a + len(own)] = (sims > score).sum(dim=1).cpu()
        t2i.ties[a : a + len(own)] = ((sims == score).sum(dim=1) - 1).cpu()  # minus itself
    return i2t, t2i


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    text_to_image: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, float | int]:
    """{"image_to_text_R@k", "text_to_image_R@k" for k in ks, "n_images", "n_texts"}.

    R@k = fraction of queries whose best positive is among the k highest-scoring candidates;
    exact ties are broken at random in expectation (:meth:`RankCounts.recall`).
    """
    if not ks or any(k < 1 for k in ks):
        raise DataError(f"recall ks must be positive integers, got {list(ks)}")
    i2t, t2i = positive_ranks(image_features, text_features, text_to_image, chunk_size)
    out: dict[str, float | int] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = i2t.recall(k)
    for k in ks:
        out[f"text_to_image_R@{k}"] = t2i.recall(k)
    out["n_images"] = len(i2t.greater)
    out["n_texts"] = len(t2i.greater)
    return out


@torch.no_grad()
def encode_captioned(
    model: Any,
    tokenizer: Tokenizer,
    loader: Iterable[tuple[torch.Tensor, Sequence[str | Sequence[str]]]],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features [N, E], text features [M, E], text_to_image [M]) float32 / int64.

    Each image comes with one caption (a str) or several (a list of str, CLIP_benchmark's
    retrieval data: one caption per line of KEY.txt).
    """
    dtype = input_dtype(model)
    images_out: list[torch.Tensor] = []
    texts_out: list[torch.Tensor] = []
    owners: list[int] = []
    n = 0
    for images, captions in loader:
        feats = model.encode_image(images.to(device=device, dtype=dtype)).float()
        images_out.append(check_finite(feats, "image"))
        texts: list[str] = []
        for i, caption in enumerate(captions):
            group = [caption] if isinstance(caption, str) else list(caption)
            texts += group
            owners += [n + i] * len(group)
        n += len(images)
        tokens = torch.as_tensor(tokenizer(texts)).to(device)
        texts_out.append(check_finite(model.encode_text(tokens).float(), "text"))
    if not images_out:
        raise DataError("the retrieval data holds no (image, caption) pair")
    text_to_image = torch.tensor(owners, dtype=torch.long)
    return torch.cat(images_out), torch.cat(texts_out), text_to_image


def encode_pairs(
    model: Any,
    tokenizer: Tokenizer,
    loader: Iterable[tuple[torch.Tensor, list[str]]],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [N, E], text features [N, E]) float32 of (images, captions) batches."""
    image_features, text_features, _ = encode_captioned(model, tokenizer, loader, device)
    return image_features, text_features


def retrieval_eval(
    model: Any,
    tokenizer: Tokenizer,
    loader: Iterable[tuple[torch.Tensor, Sequence[str | Sequence[str]]]],
    device: torch.device | str,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> dict[str, float | int]:
    """Encode every (image, caption(s)) sample of ``loader`` and return :func:`recall_at_k`."""
    image_features, text_features, owners = encode_captioned(model, tokenizer, loader, device)
    return recall_at_k(image_features, text_features, ks, owners, chunk_size=chunk_size)
