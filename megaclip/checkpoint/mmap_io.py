"""Read checkpoint files without holding them: memory-mapped loads whose pages are given back.

``torch.load(mmap=True)`` maps a file privately; a page read from it counts in the process's
resident set until the mapping goes away, so reading a whole multi-GB checkpoint through one
mapping would hold all of it. :func:`release` hands read pages back to the kernel at once
(``madvise(MADV_DONTNEED)``: for a private, unmodified file mapping the data stays valid and is
simply read from the file again if touched), and :func:`detached` copies a mapped tensor into
ordinary memory chunk by chunk, releasing as it goes. Only tensors returned by :func:`load` are
ever released: on anonymous memory MADV_DONTNEED would zero the data.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megaclip.errors import CheckpointError

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4
#: Bytes copied between two releases by :func:`detached`.
CHUNK_BYTES = 64 << 20

_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - non-glibc systems
        _madvise = None


def load(path: str | Path) -> Any:
    """torch.load of ``path`` memory-mapped (falls back to a plain load for legacy files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise _damaged(path, err) from None
    except (EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise _damaged(path, err) from None
    try:  # a file written without the zip format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise _damaged(path, err) from None


def _damaged(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {path} cannot be read ({type(err).__name__}): it is truncated or damaged"
    )


def release(t: torch.Tensor) -> None:
    """Give back the resident pages under ``t``, a (slice of a) tensor from :func:`load`."""
    if _madvise is None or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = -(-start // _PAGE) * _PAGE  # whole pages inside the tensor only
    hi = end // _PAGE * _PAGE
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_DONTNEED)


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples of ``obj``."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def release_all(obj: Any) -> None:
    """:func:`release` every tensor of an object returned by :func:`load`."""
    for t in tensors(obj):
        release(t)


def detached(src: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of mapped ``src`` in ordinary memory (cast to ``dtype``), released as copied."""
    out = torch.empty(src.shape, dtype=dtype or src.dtype, device="cpu")
    flat_src, flat_out = src.reshape(-1), out.view(-1)
    step = max(1, CHUNK_BYTES // max(1, src.element_size()))
    for a in range(0, flat_src.numel(), step):
        piece = flat_src[a : a + step]
        flat_out[a : a + step] = piece
        release(piece)
    return out
