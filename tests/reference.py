"""Single-process reference training shared by the multi-process exactness tests."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch

from megaclip.checkpoint.openclip import to_open_clip
from megaclip.config.model import ClipConfig, load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.loss.contrastive import clip_loss
from megaclip.loss.siglip import siglip_loss
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters
from megaclip.train.optim import build_optimizer, lr_at, param_groups

OPTIM = dict(lr=2e-3, weight_decay=0.1, warmup_steps=1, total_steps=10, grad_clip=0.0)


def global_batch(cfg: ClipConfig, n: int, seed: int):
    """The global batch of one step: n images and n texts (EOT at varied positions)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (n, cfg.text.context_length), generator=g)
    ends = torch.randint(2, cfg.text.context_length, (n,), generator=g)
    for i, e in enumerate(ends.tolist()):
        tokens[i, e] = cfg.text.vocab_size - 1
        tokens[i, e + 1 :] = 0
    return images, tokens


def rank_micro_batches(images, tokens, par: ParallelConfig, dp_rank: int):
    """This DP rank's contiguous share of the global batch, cut into micro-batches."""
    per_rank = par.micro_batch_size * par.grad_accum_steps
    lo = dp_rank * per_rank
    m = par.micro_batch_size
    return [
        (images[lo + k * m : lo + (k + 1) * m], tokens[lo + k * m : lo + (k + 1) * m])
        for k in range(par.grad_accum_steps)
    ]


class Reference(NamedTuple):
    """What the layouts are compared with: per-step losses, final weights, step-1 exp_avg."""

    losses: list[float]
    state: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]  # Adam's first moment after step 1: (1 - beta1) x gradient


def model_for(model: str, loss: str = "clip") -> ClipConfig:
    """The preset, with SigLIP's logit bias and temperature (paper init) for ``loss=siglip``."""
    cfg = load_preset(model)
    if loss == "siglip":
        cfg = replace(cfg, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    return cfg


def reference_loss(img, txt, logit, cfg: ClipConfig, loss: str = "clip"):
    """The single-process loss of one global batch (clamped temperature, as the engine)."""
    scale = logit[:1].clamp(0, cfg.max_logit_scale)
    if loss == "siglip":
        return siglip_loss(img, txt, scale, logit[1:2], chunk_size=None)
    return clip_loss(img, txt, scale, chunk_size=None).loss


def reference_run(
    model: str, global_size: int, steps: int, seed: int, loss: str = "clip"
) -> Reference:
    """Plain single-process training: losses, open_clip-keyed weights and step-1 moments."""
    cfg = model_for(model, loss)
    net = ClipModel(cfg)
    init_parameters(net, cfg, seed)
    opt = build_optimizer(param_groups(net, OPTIM["weight_decay"]), lr=OPTIM["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, 1.0, OPTIM["warmup_steps"], OPTIM["total_steps"], 0.0)
    )
    losses, exp_avg = [], {}
    for step in range(steps):
        images, tokens = global_batch(cfg, global_size, seed=1000 + step)
        img, txt, logit = net(images, tokens)
        value = reference_loss(img, txt, logit, cfg, loss)
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        losses.append(value.item())
        if step == 0:
            moments = {n: opt.state[p]["exp_avg"].clone() for n, p in net.named_parameters()}
            exp_avg = to_open_clip(moments)
    return Reference(losses, to_open_clip(net.state_dict()), exp_avg)
