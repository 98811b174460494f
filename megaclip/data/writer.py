"""Write webdataset shards: numbered tar files of key groups, renamed into place when complete."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping
from typing import Any

from PIL import Image

from megaclip.errors import ConfigError, DataError


def _sniff_image_ext(data: bytes) -> str:
    """File extension for encoded image bytes, from their magic number."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise DataError("image bytes are not PNG, JPEG or WebP: pass image_ext explicitly")


_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class ShardWriter:
    """Write samples into numbered tar shards of at most ``max_count`` samples each.

    ``pattern`` names shard ``i`` by ``pattern % i`` (``out/train-%06d.tar``) or
    ``pattern.format(i)`` (``out/train-{:06d}.tar``). Each shard is written to ``NAME.tmp`` and
    renamed when complete, so a reader never sees a half-written shard. Members are stored with
    fixed metadata (mtime 0, uid 0), so equal input gives byte-identical shards.
    """

    def __init__(
        self,
        pattern: str,
        max_count: int = 10000,
        *,
        max_bytes: int | None = None,
        image_format: str = "png",
        start_index: int = 0,
    ) -> None:
        if max_count < 1:
            raise ConfigError(f"max_count={max_count} must be >= 1")
        if image_format.lower() not in _PIL_FORMATS:
            raise ConfigError(f"image_format {image_format!r} is not one of {list(_PIL_FORMATS)}")
        self.pattern = pattern
        if self._name(0) == self._name(1):
            raise ConfigError(f"shard pattern {pattern!r} has no index field such as %06d")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.image_format = image_format.lower()
        self.index = start_index
        self.shards: list[str] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp = ""
        self._in_shard = 0
        self._bytes = 0

    def _name(self, i: int) -> str:
        return self.pattern % i if "%" in self.pattern else self.pattern.format(i)

    def _open(self) -> None:
        path = self._name(self.index)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tmp = path + ".tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._in_shard = 0
        self._bytes = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self._name(self.index)
        os.replace(self._tmp, path)
        self.shards.append(path)
        self._tar = None
        self.index += 1

    def write(
        self,
        key: str,
        image: bytes | Image.Image,
        caption: str,
        meta: Mapping[str, Any] | None = None,
        *,
        image_ext: str | None = None,
    ) -> None:
        """Add one sample: KEY.<image ext>, KEY.txt (UTF-8) and, when given, KEY.json."""
        if isinstance(image, Image.Image):
            ext = (image_ext or self.image_format).lower()
            if ext not in _PIL_FORMATS:
                raise ConfigError(f"image_ext {ext!r} is not one of {list(_PIL_FORMATS)}")
            buf = io.BytesIO()
            img = image if ext == "png" or image.mode == "RGB" else image.convert("RGB")
            img.save(buf, format=_PIL_FORMATS[ext])
            data = buf.getvalue()
        else:
            data = bytes(image)
            ext = (image_ext or _sniff_image_ext(data)).lower()
        members = {ext: data, "txt": caption.encode("utf-8")}
        if meta is not None:
            members["json"] = json.dumps(dict(meta), sort_keys=True).encode("utf-8")
        self.write_raw(key, members)

    def write_raw(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample given as raw member bytes by extension (no checks on the contents)."""
        base = key.rsplit("/", 1)[-1]
        if not base or "." in base or base.startswith("/") or key.startswith("/"):
            raise DataError(
                f"sample key {key!r} is invalid: it must be a relative name without '.'"
            )
        full = self._tar is not None and (
            self._in_shard >= self.max_count
            or (self.max_bytes is not None and self._bytes >= self.max_bytes)
        )
        if full:
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += 512 + len(data)
        self._in_shard += 1
        self.count += 1

    def close(self) -> list[str]:
        """Finish the current shard; the list of shard paths written."""
        self._finish()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            self._tar = None
            os.remove(self._tmp)
