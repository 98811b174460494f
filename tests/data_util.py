"""Helpers shared by the data tests: tiny shards and a fake tokenizer (no test functions here)."""

from __future__ import annotations

import os

import torch
from PIL import Image

from megaclip.data.webdataset import ShardWriter


def tiny_image(i: int, size: tuple[int, int] = (6, 5)) -> Image.Image:
    """A small RGB image whose pixels depend on ``i`` (so round trips can be checked)."""
    img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    img.putpixel((0, 0), (i % 256, 255 - i % 256, 7))
    return img


def caption_of(i: int) -> str:
    """Caption of sample ``i``; its last word is the sample number (read by fake_tokenizer)."""
    return f"a tiny picture number {i}"


def write_shards(directory: str, sizes: list[int], prefix: str = "shard") -> tuple[str, list[str]]:
    """Write shards with ``sizes[j]`` samples each; returns (brace spec, keys in write order)."""
    keys = []
    idx = 0
    paths = []
    for j, n in enumerate(sizes):
        with ShardWriter(
            os.path.join(directory, f"{prefix}-%04d.tar"), max_count=n, start_index=j
        ) as w:
            for _ in range(n):
                key = f"k{idx:05d}"
                w.write(key, tiny_image(idx), caption_of(idx), {"i": idx})
                keys.append(key)
                idx += 1
        paths.extend(w.shards)
    spec = os.path.join(directory, f"{prefix}-{{0000..{len(sizes) - 1:04d}}}.tar")
    return spec, keys


def fake_tokenizer(captions: list[str]) -> torch.Tensor:
    """[N, 77] int64: column 0 = sample number + 1, column 1 = caption length, rest 0."""
    out = torch.zeros(len(captions), 77, dtype=torch.long)
    for row, caption in enumerate(captions):
        out[row, 0] = int(caption.split()[-1]) + 1
        out[row, 1] = len(caption)
    return out
