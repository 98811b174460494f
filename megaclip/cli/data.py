"""`megaclip data`: build the bundled digits demo dataset; inspect webdataset shards."""

from __future__ import annotations

import argparse
import json
import os

from megaclip.cli.common import add_group
from megaclip.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `megaclip data {make-demo,inspect}`."""
    sub = add_group(
        subparsers,
        "data",
        help="build the demo dataset, inspect webdataset shards",
        description="Data utilities: build the digits demo dataset; inspect webdataset shards.",
        dest="data_command",
        metavar="ACTION",
    )

    demo = sub.add_parser(
        "make-demo",
        help="write scikit-learn's handwritten digits as webdataset shards (no download)",
        description="Write scikit-learn's 1797 handwritten digits as captioned webdataset shards: "
        "OUT/train-NNNNNN.tar, OUT/val-000000.tar (stratified held-out split), classnames.txt, "
        "templates.txt and manifest.json.",
    )
    demo.add_argument("out", metavar="OUT", help="output directory")
    demo.add_argument("--image-size", type=int, default=32, help="image side in pixels (32)")
    demo.add_argument("--shards", type=int, default=4, help="number of training shards (4)")
    demo.add_argument("--seed", type=int, default=0, help="split / caption seed (0)")
    demo.add_argument(
        "--val-fraction", type=float, default=0.2, help="held-out fraction per class (0.2)"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace an existing demo in OUT")
    demo.set_defaults(func=_make_demo)

    inspect = sub.add_parser(
        "inspect",
        help="count usable and skipped samples per shard",
        description="Decode every sample of the shards of SPEC (brace patterns, '::' lists) and "
        "print per shard the usable samples and the skipped ones by reason.",
    )
    inspect.add_argument(
        "spec", metavar="SPEC", help="shard spec, e.g. 'data/{000000..000009}.tar'"
    )
    inspect.add_argument("--max-image-pixels", type=int, default=None, help="decompression limit")
    inspect.add_argument("--json", action="store_true", help="print one JSON object per shard")
    inspect.add_argument(
        "--strict", action="store_true", help="exit with status 1 if anything was skipped"
    )
    inspect.set_defaults(func=_inspect)


def _make_demo(args: argparse.Namespace) -> int:
    from megaclip.data.demo import DemoConfig, make_demo

    cfg = DemoConfig(
        image_size=args.image_size,
        shards=args.shards,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    manifest = make_demo(args.out, cfg, overwrite=args.overwrite)
    for split, info in manifest["splits"].items():
        per_class = " ".join(f"{k}={v}" for k, v in info["per_class"].items())
        print(
            f"{split}: {info['count']} samples in {len(info['shards'])} shard(s) "
            f"{os.path.join(args.out, info['spec'])}"
        )
        print(f"  per class: {per_class}")
    for name in ("classnames.txt", "templates.txt", "manifest.json"):
        print(f"wrote {os.path.join(args.out, name)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from megaclip.data.shardspec import resolve_shards
    from megaclip.data.webdataset import DEFAULT_MAX_IMAGE_PIXELS, SkipStats, inspect_shard

    max_pixels = args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
    if max_pixels < 1:
        raise ConfigError("--max-image-pixels must be >= 1")
    shards = resolve_shards(args.spec)
    reports = []
    for path in shards:
        report = inspect_shard(path, max_image_pixels=max_pixels)
        reports.append(report)
        st = report.stats
        if args.json:
            print(
                json.dumps(
                    {
                        "shard": path,
                        "bytes": report.size_bytes,
                        "ok": st.ok,
                        "skipped": st.skipped,
                        "reasons": st.reasons(),
                    }
                )
            )
        else:
            status = "complete" if st.shards_read else "BROKEN"
            reasons = ", ".join(f"{k}={v}" for k, v in st.reasons().items())
            print(
                f"{path}: {st.ok} ok, {st.skipped} skipped, {report.size_bytes} bytes, {status}"
                + (f" ({reasons})" if reasons else "")
            )
    total = SkipStats.total(r.stats for r in reports)
    if not args.json:
        print(f"total: {len(shards)} shard(s), {total.summary()}")
    return 1 if args.strict and (total.skipped or total.shard_errors) else 0
