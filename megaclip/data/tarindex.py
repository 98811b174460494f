"""Key groups of a webdataset tar, and a per-shard index of their byte offsets for O(1) seeks.

A sample is a *key group*: adjacent members with the same key (the member path up to the first
dot of its file name; see :func:`split_name`). Groups are numbered ``0, 1, ...`` in archive order;
members without a key belong to no group and are skipped.

:class:`TarIndex` holds, for one local shard, the offset and key of every group's first member.
:func:`shard_index` builds it once from the tar headers (no image bytes are read) and caches it as
JSON, either next to the shard (``SHARD.idx.json``, used when present: e.g. written by the data
owner) or in the cache directory (``$MEGACLIP_TAR_INDEX_DIR``, default
``$XDG_CACHE_HOME/megaclip/tar-index``). A cached index is used only while the shard's size and
modification time match it; a seek also checks the key found at the offset, and rebuilds the index
when it does not match (a shard rewritten in place within the mtime resolution).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from megaclip.data.tario import TarReadError, iter_tar_members

log = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.json"
INDEX_DIR_ENV = "MEGACLIP_TAR_INDEX_DIR"


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member path: key up to the first dot of the file name.

    None for members that belong to no sample (no extension, or a hidden file).
    """
    slash = name.rfind("/")
    base = name[slash + 1 :]
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return name[: slash + 1] + stem, ext.lower()


Group = tuple[int, str, dict[str, bytes] | None]  # (group number, key, {ext: bytes} or None)


def iter_groups(
    fileobj: BinaryIO,
    *,
    first: int = 0,
    offset: int = 0,
    keep: Callable[[int], bool] | None = None,
    need: Callable[[int], bool] | None = None,
    progress: list[int] | None = None,
) -> Iterator[Group]:
    """Key groups of a tar stream numbered from ``first`` on (the stream starts at group ``first``).

    ``keep(n)``: whether group ``n`` is yielded at all (others are skipped without reading their
    bytes); ``need(n)``: whether its member bytes are read (else it is yielded with ``None``).
    ``offset``: the archive offset of ``fileobj``'s position. ``progress[0]`` is kept at the
    number of the next group not yet started (``first`` + groups met so far). Raises TarReadError /
    OSError when the stream breaks; the group in progress then is dropped (it may be incomplete).
    """
    if progress is not None:
        progress[0] = first
    number = first - 1
    key: str | None = None
    wanted = loaded = False

    def want(name: str) -> bool:
        nonlocal number, key, wanted, loaded
        split = split_name(name)
        if split is None:
            return False
        if split[0] != key:
            key = split[0]
            number += 1
            if progress is not None:
                progress[0] = number + 1
            wanted = keep is None or keep(number)
            loaded = wanted and (need is None or need(number))
        return loaded

    cur: tuple[int, str, bool, bool] | None = None  # (number, key, wanted, loaded)
    members: dict[str, bytes] = {}
    for name, data, _ in iter_tar_members(fileobj, want, offset):
        split = split_name(name)
        if split is None:
            continue
        if cur is None or cur[0] != number:  # want() ran for this member: number is its group
            if cur is not None and cur[2]:
                yield cur[0], cur[1], members if cur[3] else None
            cur, members = (number, split[0], wanted, loaded), {}
        if data is not None:
            members[split[1]] = data
    if cur is not None and cur[2]:
        yield cur[0], cur[1], members if cur[3] else None


@dataclass(frozen=True)
class TarIndex:
    """Offsets and keys of the key groups of one shard file, and what the index was built from."""

    size: int
    mtime_ns: int
    offsets: tuple[int, ...]
    keys: tuple[str, ...]
    end: int  # offset where reading stops: the end-of-archive marker, or the break
    error: str | None  # tar error reason when the shard is truncated / corrupt

    @property
    def groups(self) -> int:
        """Number of key groups (complete or not) whose first header was read."""
        return len(self.offsets)

    def offset_of(self, group: int) -> int:
        """Byte offset to seek to for group number ``group`` (``groups``: the end)."""
        if not 0 <= group <= len(self.offsets):
            raise IndexError(f"group {group} is not in [0, {len(self.offsets)}]")
        return self.offsets[group] if group < len(self.offsets) else self.end

    def to_json(self) -> str:
        """The index as JSON text."""
        return json.dumps(
            {
                "version": INDEX_VERSION,
                "size": self.size,
                "mtime_ns": self.mtime_ns,
                "offsets": list(self.offsets),
                "keys": list(self.keys),
                "end": self.end,
                "error": self.error,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> TarIndex:
        """Parse :meth:`to_json` output; ValueError when it is not a valid index."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") != INDEX_VERSION:
            raise ValueError("not a megaclip tar index of this version")
        offsets, keys = tuple(int(x) for x in raw["offsets"]), tuple(str(k) for k in raw["keys"])
        if len(offsets) != len(keys):
            raise ValueError("offsets and keys differ in length")
        return cls(
            int(raw["size"]), int(raw["mtime_ns"]), offsets, keys, int(raw["end"]), raw["error"]
        )


def build_index(path: str) -> TarIndex:
    """Scan the headers of one local shard (no member bytes are read) into a TarIndex."""
    st = os.stat(path)
    offsets: list[int] = []
    keys: list[str] = []
    end, error, key = 0, None, None
    with open(path, "rb") as f:
        members = iter_tar_members(f, want=lambda _name: False)
        try:
            for name, _, offset in members:
                split = split_name(name)
                if split is not None and split[0] != key:
                    key = split[0]
                    offsets.append(offset)
                    keys.append(key)
            end = f.tell() - 512  # the end-of-archive block just read
        except TarReadError as err:
            error = err.reason
            end = min(f.tell(), st.st_size)
    return TarIndex(st.st_size, st.st_mtime_ns, tuple(offsets), tuple(keys), end, error)


def index_dir() -> str:
    """Cache directory: $MEGACLIP_TAR_INDEX_DIR, or $XDG_CACHE_HOME/megaclip/tar-index."""
    explicit = os.environ.get(INDEX_DIR_ENV)
    if explicit:
        return explicit
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "megaclip", "tar-index")


def cache_path(path: str) -> str:
    """Where the cached index of shard ``path`` lives (keyed by its absolute real path)."""
    real = os.path.realpath(path)
    digest = hashlib.sha1(real.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return os.path.join(index_dir(), f"{digest}-{os.path.basename(real)}{INDEX_SUFFIX}")


def _read_cached(candidate: str, size: int, mtime_ns: int) -> TarIndex | None:
    try:
        with open(candidate, encoding="utf-8") as f:
            index = TarIndex.from_json(f.read())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index if (index.size, index.mtime_ns) == (size, mtime_ns) else None


def _write_cached(target: str, index: TarIndex) -> None:
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(index.to_json())
        os.replace(tmp, target)
    except OSError as err:  # a cache we cannot write only costs a rebuild next time
        log.debug("tar index %s not written: %s", target, err)


_MEMO: dict[str, TarIndex] = {}


def shard_index(path: str, *, rebuild: bool = False) -> TarIndex:
    """The TarIndex of a local shard: from memory, next to the shard, the cache dir, or a scan."""
    st = os.stat(path)
    memo = _MEMO.get(path)
    if (
        not rebuild
        and memo is not None
        and (memo.size, memo.mtime_ns) == (st.st_size, st.st_mtime_ns)
    ):
        return memo
    index = None
    if not rebuild:
        for candidate in (path + INDEX_SUFFIX, cache_path(path)):
            index = _read_cached(candidate, st.st_size, st.st_mtime_ns)
            if index is not None:
                break
    if index is None:
        index = build_index(path)
        _write_cached(cache_path(path), index)
    _MEMO[path] = index
    return index
