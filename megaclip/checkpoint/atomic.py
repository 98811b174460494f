"""Crash-safe file operations of the checkpoint protocol (single process; rank 0 calls them).

Layout of a checkpoint root::

    ckpt_root/
      latest              text file: the tag of the newest complete checkpoint ("step-200")
      step-100/           complete checkpoints (renamed from tmp-step-N once fully written)
      step-200/
      tmp-step-300/       a save in progress (or killed); never loaded, removed by the next save

Invariant: ``latest`` only ever names a directory that was complete (fsynced, renamed) before
``latest`` was replaced, and old directories are deleted only after that.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from megaclip.checkpoint.layout import parse_tag

LATEST = "latest"
TMP_PREFIX = "tmp-"
FAULT_ENV = "MEGACLIP_FAULT_AFTER_SAVE_STAGE"
# Points of the save protocol after which a fault can be injected (tests of crash safety).
SAVE_STAGES = ("files", "meta", "rename", "latest", "rotate")
FAULT_EXIT_CODE = 86


def fault_point(stage: str, active: bool) -> None:
    """Exit this process at once if ``$MEGACLIP_FAULT_AFTER_SAVE_STAGE == stage`` (tests only)."""
    if active and os.environ.get(FAULT_ENV) == stage:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or directory's) data and metadata to stable storage."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (bottom-up), then ``root`` itself."""
    for dirpath, _, names in os.walk(root, topdown=False):
        for name in names:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` atomically: temp file, fsync, os.replace, fsync the dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_latest(root: str | Path) -> str | None:
    """The tag ``root/latest`` names, or None when there is no ``latest`` file."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag or None


def complete_tags(root: str | Path) -> list[str]:
    """Tags of the ``step-N[-k]`` directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        key = parse_tag(p.name)
        if key is not None and p.is_dir():
            found.append((key, p.name))
    return [tag for _, tag in sorted(found)]


def remove_stale(root: str | Path) -> list[str]:
    """Delete leftovers of interrupted saves (``tmp-*`` directories); returns their names."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def commit(root: str | Path, tmp_tag: str, tag: str, fault: bool = False) -> None:
    """Publish ``root/tmp_tag`` as ``root/tag`` and point ``latest`` at it (crash-safe order)."""
    root = Path(root)
    fsync_tree(root / tmp_tag)
    os.rename(root / tmp_tag, root / tag)
    fsync_path(root)
    fault_point("rename", fault)
    write_atomic(root / LATEST, tag + "\n")
    fault_point("latest", fault)


def rotate(root: str | Path, keep_last: int | None) -> list[str]:
    """Delete all but the ``keep_last`` newest complete checkpoints (never the ``latest`` one)."""
    if not keep_last or keep_last < 1:
        return []
    tags = complete_tags(root)
    keep = set(tags[-keep_last:])
    latest = read_latest(root)
    if latest:
        keep.add(latest)
    removed = []
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(Path(root) / tag, ignore_errors=True)
            removed.append(tag)
    if removed:
        fsync_path(root)
    return removed
