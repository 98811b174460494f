"""Zero-shot classification during training, through the sharded engine (nothing gathered).

The same math as the offline evaluation (megaclip.eval.zeroshot): W[:, c] = normalize(mean over
templates of normalize(f_text(prompt))), top-k of normalize(f_img(x)) @ W. Here the features come
from :meth:`ClipEngine.features`, i.e. from the training layout itself (ZeRO-3 partitions,
pipeline stages, TP shards). Each micro-batch carries a slice of the prompts *and* a slice of
the images, so both towers work in every pass and the number of passes is the larger of the two
counts, not their sum. The passes are split over the DP ranks; partial class sums and hit counts
are all-reduced over the DP group and the result is broadcast from the last pipeline stage.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaclip.config.train import ZeroShotSection
from megaclip.errors import DataError


def _padded(x: torch.Tensor, rows: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with filler rows appended up to ``rows`` rows: copies of ``fill`` [1, ...], or zeros.

    Filler rows are computed and dropped; token rows are filled with a real prompt, so that
    every text row the model sees is a valid sequence (pooled at its end-of-text token).
    """
    if x.shape[0] == rows:
        return x
    n = rows - x.shape[0]
    pad = torch.zeros((n, *x.shape[1:]), dtype=x.dtype) if fill is None else fill.expand(n, -1)
    return torch.cat([x, pad])


def _slots(prompt_tokens: torch.Tensor, images, b: int, cfg) -> Iterator[tuple]:
    """(images [b], tokens [b], n_prompts, labels [n_images]) per pass, both streams padded."""
    prompts = prompt_tokens.split(b)
    shape = (cfg.vision.channels, cfg.vision.image_size, cfg.vision.image_size)
    empty_tokens = torch.zeros(0, prompt_tokens.shape[1], dtype=prompt_tokens.dtype)
    for p, batch in itertools.zip_longest(prompts, images):
        tokens = empty_tokens if p is None else p
        if batch is None:
            imgs, labels = torch.zeros(0, *shape), torch.zeros(0, dtype=torch.long)
        else:
            imgs, labels = batch[0].float(), torch.as_tensor(batch[1]).long()
        yield _padded(imgs, b), _padded(tokens, b, prompt_tokens[:1]), tokens.shape[0], labels


def _image_batches(zs: ZeroShotSection, classnames, image_size: int, b: int):
    from megaclip.eval.data import labeled_loader

    loader = labeled_loader(zs.data, classnames, image_size, b)
    if zs.max_samples:
        loader = itertools.islice(loader, math.ceil(zs.max_samples / b))
    for images, labels in loader:
        for start in range(0, len(labels), b):  # the loader may batch differently
            yield images[start : start + b], torch.as_tensor(labels)[start : start + b]


@torch.no_grad()
def engine_zeroshot(clip_engine, tokenizer, zs: ZeroShotSection) -> dict[str, float | int | None]:
    """Zero-shot top-1 / top-5 of the model being trained (collective; same result everywhere)."""
    from megaclip.eval.zeroshot import check_finite, fill_template, read_classnames, read_templates

    cfg, par, topo, dev = clip_engine.cfg, clip_engine.par, clip_engine.topo, clip_engine.device
    classnames, templates = read_classnames(zs.classnames), read_templates(zs.templates)
    prompts = [fill_template(t, c) for c in classnames for t in templates]  # class-major
    tokens = torch.as_tensor(tokenizer(prompts))
    owner = torch.arange(len(classnames)).repeat_interleave(len(templates))  # [C*T]
    b, dp, rank = par.micro_batch_size, par.dp, topo.coords.dp
    per_call = par.grad_accum_steps if par.pp > 1 else 1
    slots = _slots(tokens, _image_batches(zs, classnames, cfg.vision.image_size, b), b, cfg)
    # DP rank r takes passes r, r + dp, ...; every rank runs the same number of engine calls.
    mine = (s for i, s in enumerate(slots) if i % dp == rank)
    sums = torch.zeros(len(classnames), cfg.embed_dim)
    img_feats, labels = [], []
    done = torch.zeros(1, device=dev)
    k = rank  # global index of this rank's next pass
    while True:
        chunk = list(itertools.islice(mine, per_call))
        # Stop together: a rank out of passes must still join its peers' collectives.
        done.fill_(0.0 if chunk else 1.0)
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=topo.dp_group)
        if done.item() == 1.0:
            break
        real = len(chunk)
        chunk += [chunk[-1] if chunk else _dummy_slot(b, tokens, cfg)] * (per_call - real)
        feats = clip_engine.features([(s[0], s[1]) for s in chunk])
        for (_, _, n_prompts, lab), (img, txt) in zip(chunk[:real], feats[:real]):
            if n_prompts:  # pass k holds prompts [k b, k b + n_prompts)
                txt = F.normalize(check_finite(txt[:n_prompts].float().cpu(), "text"), dim=-1)
                sums.index_add_(0, owner[k * b : k * b + n_prompts], txt)
            if len(lab):
                img_feats.append(check_finite(img[: len(lab)].float().cpu(), "image"))
                labels.append(lab)
            k += dp
    return _score(clip_engine, sums, len(templates), img_feats, labels)


def _dummy_slot(b: int, tokens: torch.Tensor, cfg):
    shape = (b, cfg.vision.channels, cfg.vision.image_size, cfg.vision.image_size)
    return torch.zeros(shape), tokens[:1].expand(b, -1).clone(), 0, []


def _score(clip_engine, sums, n_templates: int, img_feats, labels) -> dict[str, float | int | None]:
    """All-reduce the class sums and hit counts over DP; broadcast from the last stage."""
    topo, dev = clip_engine.topo, clip_engine.device
    num_classes = sums.shape[0]
    stats = torch.zeros(3, dtype=torch.float64, device=dev)  # top-1 hits, top-5 hits, images
    if topo.is_last_stage:
        sums = sums.to(dev)
        dist.all_reduce(sums, group=topo.dp_group)
        classifier = F.normalize(sums / n_templates, dim=-1).T  # [E, C]
        if img_feats:
            feats, lab = torch.cat(img_feats).to(dev), torch.cat(labels).to(dev)
            top = (feats @ classifier).topk(min(5, num_classes), dim=1).indices
            hits = top == lab.unsqueeze(1)
            stats[0], stats[1], stats[2] = hits[:, 0].sum(), hits.any(dim=1).sum(), len(lab)
        dist.all_reduce(stats, group=topo.dp_group)
    if clip_engine.par.pp > 1:
        src = dist.get_process_group_ranks(topo.pp_group)[-1]
        dist.broadcast(stats, src=src, group=topo.pp_group)
    top1, top5, n = stats.tolist()
    if n == 0:
        raise DataError("the zero-shot evaluation data holds no sample")
    return {"top1": top1 / n, "top5": top5 / n if num_classes >= 5 else None, "n": int(n)}
