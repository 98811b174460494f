"""Write one-file checkpoints tensor by tensor: memory stays one tensor, whatever the file size.

Both formats are laid out before any data exists, from the list of (key, shape, dtype):

- ``.safetensors``: the JSON header with every tensor's byte range, then the raw bytes in order;
- ``.pt`` (torch's zip format): ``torch.save`` of the same object with placeholder tensors under
  ``torch.serialization.skip_data`` reserves each tensor's record; each tensor's bytes are then
  written at its record's offset. ``torch.load`` reads the result like any torch.save file.

Bytes go to the file with ordinary writes, so nothing of the output stays in this process.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from megaclip.errors import CheckpointError

Spec = tuple[str, tuple[int, ...], torch.dtype]  # (key, shape, dtype)

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (contiguous, CPU) without a copy beyond contiguity."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _check(key: str, spec: Spec, value: torch.Tensor) -> None:
    want_key, shape, dtype = spec
    if key != want_key or tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise CheckpointError(
            f"internal: streamed tensor {key} {tuple(value.shape)} {value.dtype} does not match "
            f"the planned {want_key} {tuple(shape)} {dtype}"
        )


def _safetensors_header(specs: Sequence[Spec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, shape, dtype in specs:
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"safetensors cannot hold {key} of dtype {dtype}")
        n = _nbytes(shape, dtype)
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _write_safetensors(tmp: Path, specs, tensors, metadata) -> None:
    with open(tmp, "wb") as f:
        f.write(_safetensors_header(specs, metadata))
        count = 0
        for spec, (key, value) in zip(specs, tensors):
            _check(key, spec, value)
            f.write(_raw(value))
            count += 1
        if count != len(specs):
            raise CheckpointError(f"internal: {count} of {len(specs)} tensors were streamed")


def _placeholders(specs: Sequence[Spec]) -> dict[str, torch.Tensor]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return {key: torch.empty(shape, dtype=dtype) for key, shape, dtype in specs}


def _record_offsets(path: Path, specs: Sequence[Spec], root_key: str | None) -> list[int]:
    """Byte offset of each spec's data record in a skeleton written by torch.save."""
    skeleton = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = skeleton[root_key] if root_key else skeleton
    ptrs = [state[key].untyped_storage().data_ptr() for key, _, _ in specs]
    reader = torch._C.PyTorchFileReader(str(path))
    records = [r for r in reader.get_all_records() if r.split("/")[-2:-1] == ["data"]]
    offsets = sorted(reader.get_record_offset(r) for r in records)
    if len(offsets) != len(specs):
        raise CheckpointError(f"internal: {path} reserves {len(offsets)} records, not {len(specs)}")
    # Records and storages lie in the same order in the file and in the mapping.
    order = sorted(range(len(specs)), key=lambda i: ptrs[i])
    out = [0] * len(specs)
    for rank, i in enumerate(order):
        out[i] = offsets[rank]
    base = min(ptrs)
    for i, off in enumerate(out):  # the mapping is the file: relative positions must agree
        if ptrs[i] - base != off - offsets[0]:
            raise CheckpointError(f"internal: cannot locate tensor {specs[i][0]} in {path}")
    return out


def _write_torch(tmp: Path, specs, tensors, wrapper: dict[str, Any], root_key: str | None):
    placeholders = _placeholders(specs)
    obj = {**wrapper, root_key: placeholders} if root_key else placeholders
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(obj, tmp)
    offsets = _record_offsets(tmp, specs, root_key)
    count = 0
    with open(tmp, "r+b") as f:
        for spec, offset, (key, value) in zip(specs, offsets, tensors):
            _check(key, spec, value)
            f.seek(offset)
            f.write(_raw(value))
            count += 1
    if count != len(specs):
        raise CheckpointError(f"internal: {count} of {len(specs)} tensors were streamed")


def write_stream(
    path: str | Path,
    specs: Sequence[Spec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    safetensors_metadata: dict[str, str] | None = None,
    torch_wrapper: dict[str, Any] | None = None,
    torch_root_key: str | None = None,
) -> Path:
    """Write ``tensors`` (in ``specs`` order) to ``path``: .safetensors, or .pt/.pth/.bin.

    .pt files hold ``{**torch_wrapper, torch_root_key: {key: tensor}}`` (or the bare dict when
    ``torch_root_key`` is None). Written to a temporary name, then renamed: an interrupted write
    never leaves a partial file at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            _write_safetensors(tmp, specs, tensors, safetensors_metadata or {})
        elif path.suffix in (".pt", ".pth", ".bin"):
            _write_torch(tmp, specs, tensors, torch_wrapper or {}, torch_root_key)
        else:
            raise CheckpointError(f"--out {path}: use a .pt or .safetensors file name")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
