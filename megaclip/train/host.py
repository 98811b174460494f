"""This host's processes and memory as Linux's /proc shows them (None / defaults elsewhere).

The one place megaclip reads /proc: a process's resident set and its high-water mark
(``/proc/PID/status``), resetting that mark (``/proc/self/clear_refs``), the node's available
memory (``/proc/meminfo``), whether a process is alive or a zombie (``/proc/PID/stat``), the
process table, and what PID 1 runs.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _kib_field(path: str, field: str) -> int | None:
    """The ``FIELD:  N kB`` value of a /proc text file, in KiB (None if absent or unreadable)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A KiB field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...), None when unreadable."""
    return _kib_field(f"/proc/{pid}/status", field)


def meminfo_kib(field: str) -> int | None:
    """A KiB field of ``/proc/meminfo`` (``MemAvailable``, ...), None when unreadable."""
    return _kib_field("/proc/meminfo", field)


def reset_rss_peak() -> None:
    """Reset this process's resident-set high-water mark (``VmHWM``); no-op where impossible."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] not in ("Z", "X")


def process_table() -> dict[int, tuple[int, list[bytes]]]:
    """``{pid: (parent pid, argv)}`` of every process that can be read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if fields is not None:
            table[int(entry.name)] = (int(fields[1]), argv)
    return table


def children_of(pids: int | list[int]) -> list[int]:
    """Processes whose parent is ``pids`` (one pid or several)."""
    want = {pids} if isinstance(pids, int) else set(pids)
    return [pid for pid, (ppid, _) in process_table().items() if ppid in want]


def adopted_by_init(parent: int) -> bool:
    """Whether ``parent`` is PID 1 that is not a torch launcher (we were orphaned and adopted).

    A launcher that died before a rank armed its death signal leaves the rank to PID 1;
    torchrun itself may be PID 1 in a container, so PID 1 running torch does not count.
    """
    if parent != 1:
        return False
    try:
        init = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return False
    return b"torch" not in init
