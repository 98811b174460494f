"""Data loading throughput: megaclip's loader vs open_clip's pipeline on the same JPEG shards.

    PYTHONPATH=. python benchmarks/data_throughput.py [--samples 1200] [--repeats 3] [--out DIR]

Shards: real photos (scikit-learn's two sample images; random crops, longer side 320..800 px,
JPEG quality 90; megaclip.data.photos). Both pipelines run in this process on one core (CPU
affinity to one core, one torch thread, no DataLoader workers), read every sample once, produce
float32 [B, 3, 224, 224] images and int64 [B, 77] CLIP tokens, in batches of 64:

* megaclip: ``build_webdataset_loader(train=...)`` with megaclip's CLIP tokenizer (training:
  random resized crop with reduced-size JPEG decoding, shuffle windows of 1000; evaluation:
  resize + center crop, identical to open_clip's);
* open_clip: webdataset (``tarfile_to_samples``, ``shuffle(1000)`` when training,
  ``decode("pilrgb")``) + ``open_clip.transform.image_transform(224, is_train)`` + open_clip's
  tokenizer per sample, batched by webdataset, as open_clip's training script builds it.

Timing: process CPU time (on a shared machine wall time mostly measures the scheduler); the
passes alternate A B B A ..., the best pass of each side counts. Prints one JSON line per
transform (train, eval): ``megaclip_samples_per_s``, ``open_clip_samples_per_s``, ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megaclip.data.loader import build_webdataset_loader  # noqa: E402
from megaclip.data.photos import make_photo_shards  # noqa: E402
from megaclip.data.shardspec import resolve_shards  # noqa: E402
from megaclip.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402

BATCH = 64


def megaclip_pass(spec: str, train: bool) -> int:
    """One epoch through megaclip's loader; the number of samples."""
    from megaclip.tokenizer import build_tokenizer

    tok = build_tokenizer("clip_bpe", context_length=77)
    loader = build_webdataset_loader(spec, tok, 224, BATCH, train=train, workers=0, drop_last=False)
    n = 0
    for images, tokens in loader:
        assert images.shape[1:] == (3, 224, 224) and tokens.shape[1] == 77
        n += images.shape[0]
    return n


def open_clip_pass(spec: str, train: bool) -> int:
    """One epoch through webdataset + open_clip's transform and tokenizer; the samples."""
    import open_clip
    import webdataset as wds
    from open_clip.transform import image_transform

    preprocess = image_transform(224, is_train=train, mean=CLIP_MEAN, std=CLIP_STD)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    stages = [
        wds.SimpleShardList(resolve_shards(spec)),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
    ]
    if train:
        stages.append(wds.shuffle(1000, initial=1000))
    stages += [
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(BATCH, partial=True),
    ]
    n = 0
    for images, tokens in wds.DataPipeline(*stages):
        assert images.shape[1:] == (3, 224, 224) and tokens.shape[1] == 77
        n += images.shape[0]
    return n


def measure(spec: str, train: bool, repeats: int) -> dict:
    """Best-of-``repeats`` CPU-time throughput of both pipelines, alternating."""
    best = {"megaclip": float("inf"), "open_clip": float("inf")}
    counts = {}
    sides = [("megaclip", megaclip_pass), ("open_clip", open_clip_pass)]
    for r in range(repeats):
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            t0, w0 = time.process_time(), time.perf_counter()
            counts[name] = fn(spec, train)
            dt = time.process_time() - t0
            best[name] = min(best[name], dt)
            print(
                f"  {'train' if train else 'eval'} {name}: {counts[name]} samples, {dt:.2f} s CPU, "
                f"{time.perf_counter() - w0:.2f} s wall",
                file=sys.stderr,
                flush=True,
            )
    if counts["megaclip"] != counts["open_clip"]:
        raise SystemExit(f"sample counts differ: {counts}")
    mc, oc = counts["megaclip"] / best["megaclip"], counts["open_clip"] / best["open_clip"]
    return {
        "transform": "train" if train else "eval",
        "samples": counts["megaclip"],
        "megaclip_samples_per_s": round(mc, 1),
        "open_clip_samples_per_s": round(oc, 1),
        "ratio": round(mc / oc, 3),
        "clock": "process CPU time, one core",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1200)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="shard directory (default: a temporary one)")
    p.add_argument("--transforms", default="train,eval")
    args = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        spec = make_photo_shards(out, args.samples, args.shards, seed=0)
        for name in args.transforms.split(","):
            print(json.dumps(measure(spec, name == "train", args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
