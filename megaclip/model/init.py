"""Deterministic initialisation, independent of the parallel layout, without full tensors.

Every parameter's *full* (unsharded) initial value is a pure function of (seed, open_clip key,
shape): its flattened elements are cut into blocks of :data:`BLOCK` elements and block ``j`` is
drawn from a generator seeded by (seed, key, j). Any piece of it (a TP shard, a pipeline stage's
parameter, a ZeRO-3 partition of a TP shard) can therefore be computed alone, in bounded memory,
and every layout starts from exactly the weights of the single-process model with the same seed.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
from torch import nn

from megaclip.config.model import ClipConfig
from megaclip.model.naming import to_open_clip_key
from megaclip.parallel.layers import tp_world
from megaclip.parallel.shapes import full_shape, shard, shard_row_runs
from megaclip.parallel.sharding import tp_partition

#: Elements per independent random stream of a parameter's flattened full value.
BLOCK = 1 << 20
#: Upper bound on the full-tensor elements generated at once (transient memory of one fill).
CHUNK = 1 << 22


def _std(key: str, cfg: ClipConfig) -> float | None:
    """Normal std for ``key`` (open_clip-style scaled init); None for constants."""
    visual = key.startswith("visual.")
    tower = cfg.vision if visual else cfg.text
    w, n = tower.width, tower.layers
    proj_std = w**-0.5 * (2 * n) ** -0.5
    if key.endswith("bias") or ".ln_" in f".{key}" or key.startswith("ln_"):
        return None  # LayerNorm gains 1, biases 0
    if key.endswith("attn.in_proj_weight"):
        return w**-0.5
    if key.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
        return proj_std
    if key.endswith("mlp.c_fc.weight"):
        return (2 * w) ** -0.5
    if key == "token_embedding.weight":
        return 0.02
    if key == "positional_embedding":
        return 0.01
    if key == "visual.conv1.weight":
        return (cfg.vision.channels * cfg.vision.patch_size**2) ** -0.5
    if key in ("visual.class_embedding", "visual.positional_embedding", "visual.proj"):
        return w**-0.5
    if key == "text_projection":
        return w**-0.5
    raise KeyError(f"no init rule for {key}")


def _constant(key: str, cfg: ClipConfig) -> float:
    if key == "logit_scale":
        return cfg.init_logit_scale
    if key == "logit_bias":
        return float(cfg.init_logit_bias or 0.0)
    return 1.0 if key.endswith("weight") else 0.0


def _block_seed(seed: int, key: str, block: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{key}#{block}".encode())) % 2**63


def full_flat(key: str, numel: int, cfg: ClipConfig, seed: int, start: int, stop: int):
    """Elements [start, stop) of the flattened full fp32 initial value of ``key`` (numel long)."""
    std = None if key in ("logit_scale", "logit_bias") else _std(key, cfg)
    if std is None:
        return torch.full((stop - start,), _constant(key, cfg))
    out = torch.empty(stop - start)
    for b in range(start // BLOCK, (stop - 1) // BLOCK + 1) if stop > start else ():
        lo, n = b * BLOCK, min(BLOCK, numel - b * BLOCK)  # block length depends on numel only
        gen = torch.Generator().manual_seed(_block_seed(seed, key, b))
        block = torch.randn(n, generator=gen)
        a, z = max(start, lo), min(stop, lo + n)
        out[a - start : z - start] = block[a - lo : z - lo]
    return out.mul_(std)


def full_rows(key: str, shape: tuple[int, ...], cfg: ClipConfig, seed: int, r0: int, r1: int):
    """Rows [r0, r1) (dim 0) of the full initial value of ``key``, shape [r1 - r0, *shape[1:]]."""
    row = math.prod(shape[1:])
    flat = full_flat(key, math.prod(shape), cfg, seed, r0 * row, r1 * row)
    return flat.view(r1 - r0, *shape[1:])


@torch.no_grad()
def fill_local(
    dest: torch.Tensor,
    key: str,
    local_shape: tuple[int, ...],
    partition: tuple[int | None, int],
    tp: tuple[int, int],
    cfg: ClipConfig,
    seed: int,
    flat_start: int = 0,
) -> None:
    """dest[:] = flat elements [flat_start, flat_start + dest.numel()) of a TP shard's init.

    ``local_shape``: the TP shard's shape; ``partition``: (dim, stride) of the shard
    (megaclip.parallel.shapes.shard); ``tp``: (rank, size). ``dest`` is 1-D (any dtype); a ZeRO-3
    partition passes its own flat range. Full rows are generated :data:`CHUNK` elements at a time.
    """
    (dim, stride), (rank, size) = partition, tp
    local_shape = tuple(local_shape) or (1,)
    shape = full_shape(local_shape, dim, size)
    row_local = math.prod(local_shape[1:])
    row_full = math.prod(shape[1:])
    total = math.prod(local_shape)
    start, stop = flat_start, min(flat_start + dest.numel(), total)
    if stop <= start:
        return
    step = max(1, CHUNK // max(1, row_full))
    j = start // row_local
    while j * row_local < stop:
        j1 = min(j + step, -(-stop // row_local))
        if dim == 0:
            rows = torch.empty(j1 - j, *local_shape[1:])
            for local, full, n in shard_row_runs((j, j1), shape[0], stride, rank, size):
                rows[local - j : local - j + n] = full_rows(key, shape, cfg, seed, full, full + n)
        else:
            rows = full_rows(key, shape, cfg, seed, j, j1)
            if dim is not None:
                rows = shard(rows, dim, stride, rank, size)
        flat = rows.reshape(-1)
        a, z = max(start, j * row_local), min(stop, j1 * row_local)
        dest[a - start : z - start] = flat[a - j * row_local : z - j * row_local]
        j = j1


def init_full(key: str, shape: tuple[int, ...], cfg: ClipConfig, seed: int) -> torch.Tensor:
    """The full fp32 initial value of the parameter with open_clip key ``key`` (tests, tools)."""
    return full_rows(key, tuple(shape) or (1,), cfg, seed, 0, (tuple(shape) or (1,))[0]).view(shape)


@torch.no_grad()
def init_parameters(
    model: nn.Module, cfg: ClipConfig, seed: int, tp_group: dist.ProcessGroup | None = None
) -> None:
    """Fill every (materialised) parameter of ``model``, any TP shard / stage, in place."""
    tp = tp_world(tp_group)
    for name, param in model.named_parameters():
        key = to_open_clip_key(name)
        flat = param.data.view(-1)
        fill_local(flat, key, tuple(param.shape), tp_partition(name), tp, cfg, seed)
