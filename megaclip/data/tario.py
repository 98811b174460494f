"""A minimal streaming tar reader (POSIX ustar, GNU long names, pax headers).

Written for webdataset shards: it yields regular-file members in archive order and tells a
truncated archive (cut short by a failed copy or a full disk) apart from a corrupt header, so
the caller can stop that shard, count the reason and go on. No seeking is needed; when the
stream is seekable, members the caller does not want are skipped without reading their bytes.
:func:`iter_tar_members` also reports each member's byte offset (of its first header block,
extended headers included), from which a reader can later resume by seeking (tarindex.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# typeflags of members that carry file contents: regular file (old and new spelling), contiguous
_REGULAR = (b"0", b"\0", b"7")


class TarReadError(Exception):
    """A tar stream could not be read to its end; ``reason`` is 'truncated_tar' or 'corrupt_tar'."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _parse_number(field: bytes) -> int:
    """Value of a numeric header field: NUL/space-terminated octal, or GNU base-256."""
    if field and field[0] & 0x80:
        value = field[0] & 0x7F
        for byte in field[1:]:
            value = (value << 8) | byte
        if field[0] & 0x40:  # negative base-256 (never valid for sizes)
            raise TarReadError("corrupt_tar", "negative number in tar header")
        return value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as err:
        raise TarReadError("corrupt_tar", f"bad octal field {field!r} in tar header") from err


def _checksum_ok(header: bytes) -> bool:
    """True when the header's stored checksum matches its bytes (unsigned or signed sum)."""
    try:
        stored = _parse_number(header[148:156])
    except TarReadError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    if stored == sum(blanked):
        return True
    return stored == sum(b - 256 if b > 127 else b for b in blanked)  # old tars: signed sum


def _cstr(field: bytes) -> str:
    """A NUL-terminated header string field, decoded as UTF-8 (invalid bytes replaced)."""
    return field.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _pax_path(data: bytes) -> str | None:
    """The 'path' record of a pax extended header, if any ('%d key=value\\n' records)."""
    path = None
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarReadError("corrupt_tar", "malformed pax header record") from None
        if length <= 0:
            raise TarReadError("corrupt_tar", "malformed pax header record")
        record = data[space + 1 : pos + length - 1]  # drop the trailing newline
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", errors="replace")
        pos += length
    return path


class _Stream:
    """Reads exact byte counts from a binary stream and skips forward (seeking when possible)."""

    def __init__(self, fileobj: BinaryIO, offset: int = 0) -> None:
        self.f = fileobj
        self.pos = offset  # bytes of the archive before the next read
        try:
            self.seekable = bool(fileobj.seekable())
        except (AttributeError, OSError):
            self.seekable = False

    def read(self, n: int) -> bytes:
        chunks = []
        left = n
        while left > 0:
            chunk = self.f.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        self.pos += n - left
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def skip(self, n: int) -> None:
        if n <= 0:
            return
        self.pos += n
        if self.seekable:
            self.f.seek(n, 1)  # past EOF is allowed; the next header read then finds no data
            return
        while n > 0:
            chunk = self.f.read(min(n, 1 << 20))
            if not chunk:
                return
            n -= len(chunk)


def iter_tar(
    fileobj: BinaryIO, want: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """Yield ``(name, data)`` for each regular-file member of a tar stream, in archive order.

    ``want(name)`` is called once per member in order; when it returns False the member's bytes
    are skipped and ``data`` is None. The stream must end with the end-of-archive marker (a zero
    block): end of file before it raises ``TarReadError('truncated_tar')``; a header whose
    checksum or numbers are invalid raises ``TarReadError('corrupt_tar')``.
    """
    for name, data, _ in iter_tar_members(fileobj, want):
        yield name, data


def iter_tar_members(
    fileobj: BinaryIO, want: Callable[[str], bool] | None = None, offset: int = 0
) -> Iterator[tuple[str, bytes | None, int]]:
    """Like :func:`iter_tar`, yielding ``(name, data, header offset)``.

    The offset is where the member's first header block (a GNU long-name or pax header when
    present) starts, counted from the archive start; ``offset`` is the archive position of
    ``fileobj``'s current position (after a seek into the archive).
    """
    stream = _Stream(fileobj, offset)
    long_name: str | None = None
    pax_name: str | None = None
    start: int | None = None  # offset of the pending extended header, if any
    while True:
        here = stream.pos
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            raise TarReadError(
                "truncated_tar",
                "archive ends without its end-of-archive marker"
                if not header
                else "archive ends inside a member header",
            )
        if header == _ZERO_BLOCK:
            return
        if not _checksum_ok(header):
            raise TarReadError("corrupt_tar", "tar header checksum mismatch")
        size = _parse_number(header[124:136])
        typeflag = header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        if typeflag in _REGULAR:
            name = pax_name or long_name or _header_name(header)
            first = here if start is None else start
            pax_name = long_name = start = None
            if want is not None and not want(name):
                stream.skip(padded)
                yield name, None, first
                continue
            data = stream.read(size)
            if len(data) < size:
                raise TarReadError("truncated_tar", f"archive ends inside member {name!r}")
            stream.skip(padded - size)
            yield name, data, first
        elif typeflag in (b"L", b"x"):
            start = here if start is None else start
            data = stream.read(padded)
            if len(data) < size:
                raise TarReadError("truncated_tar", "archive ends inside an extended header")
            if typeflag == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", errors="replace")
            else:
                pax_name = _pax_path(data[:size])
        else:  # directories, links, global pax headers, devices: no sample data
            start = None
            stream.skip(padded)


def _header_name(header: bytes) -> str:
    """Member name from a header: the ustar prefix field joined with the name field."""
    name = _cstr(header[0:100])
    if header[257:262] == b"ustar":
        prefix = _cstr(header[345:500])
        if prefix:
            return f"{prefix}/{name}"
    return name
