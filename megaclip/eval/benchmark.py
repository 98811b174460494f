"""CLIP_benchmark's webdataset layout: read it for ``megaclip eval``, write it from labelled shards.

    DIR/classnames.txt                          one class name per line; line i is label i
    DIR/zeroshot_classification_templates.txt   one prompt per line, the class name as {c}
    DIR/dataset_type.txt                        optional: "retrieval" (default: classification)
    DIR/<split>/nshards.txt                     the number of shards N
    DIR/<split>/0.tar ... <N-1>.tar             KEY.webp|png|jpg|jpeg plus KEY.cls (the label
                                                as text) or, for retrieval, KEY.txt (one
                                                caption per line)

This is what ``clip_benchmark eval --dataset wds/NAME --dataset_root DIR`` reads (and what its
``clip_benchmark_export_wds`` writes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from megaclip.data.reader import IMAGE_EXTS
from megaclip.data.shardspec import resolve_shards
from megaclip.data.sources import open_shard
from megaclip.data.tarindex import iter_groups
from megaclip.data.writer import ShardWriter
from megaclip.errors import DataError
from megaclip.eval.data import parse_label
from megaclip.eval.zeroshot import BENCHMARK_PLACEHOLDER, read_classnames, read_templates

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"


@dataclass(frozen=True)
class BenchmarkData:
    """One split of a CLIP_benchmark webdataset directory."""

    root: str
    split: str
    kind: str  # "classification" or "retrieval"
    shards: list[str]
    classnames: list[str] | None
    templates: list[str] | None


def splits_of(root: str) -> list[str]:
    """The splits of a CLIP_benchmark directory: subfolders holding nshards.txt."""
    if not os.path.isdir(root):
        return []
    return sorted(
        d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, NSHARDS_FILE))
    )


def is_benchmark_dir(path: str) -> bool:
    """Whether ``path`` is a CLIP_benchmark webdataset directory (a split with nshards.txt)."""
    return bool(splits_of(path))


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_benchmark_dir(root: str, split: str = "test") -> BenchmarkData:
    """The shards, type, class names and templates of ``split`` of a CLIP_benchmark directory."""
    found = splits_of(root)
    if split not in found:
        raise DataError(
            f"{root} has no split {split!r} (no {split}/{NSHARDS_FILE}); its splits: "
            f"{', '.join(found) or 'none'}; pass --split"
        )
    text = _read_text(os.path.join(root, split, NSHARDS_FILE)) or ""
    try:
        n = int(text.strip())
    except ValueError:
        raise DataError(
            f"{root}/{split}/{NSHARDS_FILE} holds {text.strip()!r}, not a count"
        ) from None
    shards = [os.path.join(root, split, f"{i}.tar") for i in range(n)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing or not shards:
        raise DataError(
            f"{root}/{split}: {NSHARDS_FILE} says {n} shards, but "
            + (f"{missing[0]} does not exist" if missing else "a split needs at least one")
        )
    kind = (_read_text(os.path.join(root, TYPE_FILE)) or "classification").strip().lower()
    classnames = templates = None
    if kind != "retrieval":
        classnames = read_classnames(os.path.join(root, CLASSNAMES_FILE))
        if os.path.isfile(os.path.join(root, TEMPLATES_FILE)):
            templates = read_templates(os.path.join(root, TEMPLATES_FILE))
    return BenchmarkData(root, split, kind, shards, classnames, templates)


def benchmark_template(template: str) -> str:
    """A megaclip ``{}`` template in CLIP_benchmark's ``str.format`` form (``{c}``)."""
    if BENCHMARK_PLACEHOLDER in template:
        return template
    escaped = template.replace("{", "{{").replace("}", "}}")
    return escaped.replace("{{}}", BENCHMARK_PLACEHOLDER)


def labeled_samples(
    spec: str | Sequence[str], label_ext: str = "json"
) -> Iterator[tuple[str, str, bytes, int]]:
    """(key, image ext, image bytes, label) of every labelled sample of shards, undecoded."""
    for path in resolve_shards(spec):
        with open_shard(path) as f:
            for _, key, members in iter_groups(f):
                yield _labeled(path, key, members or {}, label_ext)


def _labeled(
    path: str, key: str, members: dict[str, bytes], label_ext: str
) -> tuple[str, str, bytes, int]:
    """(key, image ext, image bytes, label) of one sample; DataError when a member is missing."""
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    raw = members.get(label_ext)
    label = parse_label(raw.decode("utf-8", "replace"), label_ext) if raw else -1
    if ext is None or label < 0:
        raise DataError(f"sample {path}:{key} lacks an image or a .{label_ext} label")
    return key, ext, members[ext], label


def write_benchmark_dir(
    out_dir: str,
    samples: Iterable[tuple[str, str, bytes, int]],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    split: str = "test",
    shard_size: int = 1000,
) -> BenchmarkData:
    """Write a CLIP_benchmark zero-shot classification directory from (key, ext, bytes, label)."""
    split_dir = os.path.join(out_dir, split)
    if os.path.exists(os.path.join(split_dir, NSHARDS_FILE)):
        raise DataError(f"{split_dir} already holds a CLIP_benchmark split; choose another --out")
    with ShardWriter(os.path.join(split_dir, "%d.tar"), shard_size) as writer:
        for key, ext, data, label in samples:
            writer.write_raw(key, {ext: data, "cls": str(int(label)).encode()})
    with open(os.path.join(split_dir, NSHARDS_FILE), "w", encoding="utf-8") as f:
        f.write(f"{len(writer.shards)}\n")
    with open(os.path.join(out_dir, CLASSNAMES_FILE), "w", encoding="utf-8") as f:
        f.write("".join(f"{c}\n" for c in classnames))
    with open(os.path.join(out_dir, TEMPLATES_FILE), "w", encoding="utf-8") as f:
        f.write("".join(f"{benchmark_template(t)}\n" for t in templates))
    return read_benchmark_dir(out_dir, split)
