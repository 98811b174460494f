"""Zero-shot classification: prompt-ensemble classifier from class names, top-1 / top-5 accuracy.

``model`` is anything with ``encode_image(images) -> [B, E]`` and ``encode_text(tokens) -> [B, E]``
returning L2-normalised features (a ClipModel, or :class:`megaclip.eval.model.NormalizedEncoder`
around an open_clip model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from megaclip.errors import CheckpointError, DataError

Tokenizer = Callable[[list[str]], torch.Tensor]
PLACEHOLDER = "{}"
BENCHMARK_PLACEHOLDER = "{c}"  # CLIP_benchmark's templates: template.format(c=classname)


def _read_nonempty_lines(path: str, what: str) -> list[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i + 1, line.strip()) for i, line in enumerate(f)]
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path!r}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {what} file {path!r}: {err}") from None
    lines = [(n, s) for n, s in lines if s]
    if not lines:
        raise DataError(f"{what} file {path!r} is empty; write one entry per line")
    return lines


def read_classnames(path: str) -> list[str]:
    """Class names, one per non-empty line; line i (0-based, blank lines skipped) is label i."""
    return [s for _, s in _read_nonempty_lines(path, "classnames")]


def check_templates(templates: Sequence[str], where: str = "templates") -> None:
    """DataError unless every template contains the class-name placeholder ``{}``."""
    if not templates:
        raise DataError(f"{where}: no prompt template given")
    for i, t in enumerate(templates):
        if not has_placeholder(t):
            raise DataError(
                f"{where}: template {i + 1} {t!r} has no '{{}}' placeholder for the class name "
                "(write e.g. 'a photo of a {}.')"
            )


def has_placeholder(template: str) -> bool:
    """Whether ``template`` has a class-name placeholder: ``{}`` or CLIP_benchmark's ``{c}``."""
    return PLACEHOLDER in template or BENCHMARK_PLACEHOLDER in template


def read_templates(path: str) -> list[str]:
    """Prompt templates, one per non-empty line, each containing ``{}`` (DataError otherwise)."""
    lines = _read_nonempty_lines(path, "templates")
    for n, t in lines:
        if not has_placeholder(t):
            raise DataError(
                f"templates file {path!r}, line {n}: {t!r} has no '{{}}' placeholder for the "
                "class name (write e.g. 'a photo of a {}.', or CLIP_benchmark's '{c}')"
            )
    return [t for _, t in lines]


def fill_template(template: str, classname: str) -> str:
    """The prompt: ``{}`` replaced by ``classname``, or ``template.format(c=classname)`` (``{c}``).

    ``{}`` templates get no other formatting (other braces stay); ``{c}`` templates are
    CLIP_benchmark's, filled exactly as it fills them.
    """
    if BENCHMARK_PLACEHOLDER not in template:
        return template.replace(PLACEHOLDER, classname)
    try:
        return template.format(c=classname)
    except (KeyError, IndexError, ValueError):
        raise DataError(
            f"template {template!r}: a CLIP_benchmark template may hold only the field {{c}} "
            "(write other braces as {{ and }})"
        ) from None


def input_dtype(model: Any) -> torch.dtype:
    """The floating dtype of the model's parameters (float32 when it has none)."""
    params = model.parameters() if hasattr(model, "parameters") else ()
    return next((p.dtype for p in params if p.is_floating_point()), torch.float32)


def check_finite(features: torch.Tensor, what: str) -> torch.Tensor:
    """``features`` unchanged; CheckpointError when any entry is NaN or infinite."""
    if not bool(torch.isfinite(features).all()):
        raise CheckpointError(
            f"the model produced non-finite {what} features (NaN/inf): the checkpoint's weights "
            "are broken or the precision overflows; try --precision fp32"
        )
    return features


@torch.no_grad()
def build_classifier(
    model: Any,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot weights W [E, C]: W[:, c] = normalize(mean_t normalize(f_text(t(class c)))).

    All C * T prompts are encoded in batches of ``batch_size``; per-class sums are accumulated in
    float32 so memory stays O(C * E).
    """
    if not classnames:
        raise DataError("no class names given")
    check_templates(templates)
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    n_t = len(templates)
    prompts = [fill_template(t, c) for c in classnames for t in templates]  # class-major
    owner = torch.arange(len(classnames), device=device).repeat_interleave(n_t)  # [C*T]
    sums: torch.Tensor | None = None
    for start in range(0, len(prompts), batch_size):
        tokens = torch.as_tensor(tokenizer(prompts[start : start + batch_size])).to(device)
        feats = check_finite(model.encode_text(tokens).float(), "text")
        feats = F.normalize(feats, dim=-1)  # [b, E]
        if sums is None:
            sums = torch.zeros(len(classnames), feats.shape[1], device=device)
        sums.index_add_(0, owner[start : start + len(feats)], feats)
    assert sums is not None
    return F.normalize(sums / n_t, dim=-1).T.contiguous()  # [E, C]


@torch.no_grad()
def zeroshot_eval(
    model: Any,
    classifier: torch.Tensor,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
) -> dict[str, float | int | None]:
    """Accuracy of argmax(f_img(x) @ W): {"top1", "top5" (None when C < 5), "n"}.

    top-k counts a sample as correct when its label is among the k largest logits.
    """
    num_classes = classifier.shape[1]
    k = min(5, num_classes)
    dtype = input_dtype(model)
    classifier = classifier.to(device=device, dtype=torch.float32)
    correct1 = correct5 = n = 0
    for images, labels in loader:
        feats = model.encode_image(images.to(device=device, dtype=dtype)).float()  # [B, E]
        check_finite(feats, "image")
        logits = feats @ classifier  # [B, C]
        labels = torch.as_tensor(labels).to(device)
        top = logits.topk(k, dim=1).indices  # [B, k]
        hits = top == labels.unsqueeze(1)  # [B, k]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        n += len(labels)
    if n == 0:
        raise DataError("the zero-shot evaluation data holds no sample")
    return {
        "top1": correct1 / n,
        "top5": correct5 / n if num_classes >= 5 else None,
        "n": n,
    }
