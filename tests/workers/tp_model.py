"""Worker: a CLIP model split over TP ranks (x DP replicas); saves features, loss, full grads."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters
from megaclip.parallel.runtime import clean_exit, init_distributed
from megaclip.parallel.topology import Topology
from megaclip.parallel.tp_state import full_grads


def batch(cfg, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (n, cfg.text.context_length), generator=g)
    tokens[:, -3] = cfg.text.vocab_size - 1
    return images, tokens


def local_clip_loss(img, txt, logit_scale):
    logits = logit_scale.exp() * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def main(out_dir: str, tp: int, model_name: str) -> None:
    rank, world = init_distributed()
    topo = Topology(ParallelConfig(tp=tp, dp=world // tp))
    cfg = load_preset(model_name)
    model = ClipModel(cfg, tp_group=topo.tp_group)
    init_parameters(model, cfg, seed=11, tp_group=topo.tp_group)
    images, tokens = batch(cfg, 4, seed=100 + topo.coords.dp)  # same data within a TP group
    img, txt, scale = model(images, tokens)
    loss = local_clip_loss(img, txt, scale)
    loss.backward()
    grads = full_grads(model, topo.tp_group)
    if topo.coords.tp == 0:
        torch.save(
            {"img": img.detach(), "txt": txt.detach(), "loss": loss.detach(), "grads": grads},
            f"{out_dir}/rank{rank}.pt",
        )
    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
