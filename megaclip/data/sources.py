"""Where shard bytes come from: local files, ``pipe:CMD`` commands, http(s) and fsspec URLs.

* a local path: opened directly (seekable: a resume seeks with the shard's tar index);
* ``pipe:CMD``: ``CMD`` runs through the shell and the shard is its standard output, as in
  webdataset / open_clip (``pipe:aws s3 cp s3://bucket/00000.tar -``). A command that exits with a
  non-zero status, or prints nothing, fails the shard with a message naming the command and the
  end of its standard error;
* ``http://`` / ``https://``: streamed with the standard library (no extra package);
* any other ``SCHEME://`` URL (``s3://``, ``gs://``, ``hf://``, ...): through fsspec and the
  filesystem package for that scheme (``s3fs`` for s3), when installed
  (``pip install 'megaclip[remote]'``).

Remote streams are read front to back, never seeked: a resume inside such a shard reads (and
discards) the bytes before the position. Every failure to open or read raises OSError
(:class:`ShardOpenError` when the stream itself reports it), which the reader counts as an
``unreadable_shard`` and skips.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from typing import IO, Any, BinaryIO

PIPE_PREFIX = "pipe:"
HTTP_PREFIXES = ("http://", "https://")
_LOCAL_BUFFER = 1 << 20  # large reads suit network file systems; seeks inside it cost no syscall
_HTTP_TIMEOUT_S = 60.0
_STDERR_TAIL = 300


class ShardOpenError(OSError):
    """A shard's source failed: the command exited non-zero, the URL could not be fetched."""


def is_pipe(url: str) -> bool:
    """Whether ``url`` is a ``pipe:CMD`` spec."""
    return url.startswith(PIPE_PREFIX)


def url_scheme(url: str) -> str | None:
    """The ``SCHEME`` of a ``SCHEME://`` URL (lower case), None for local paths and pipes."""
    if is_pipe(url):
        return None
    head, sep, _ = url.partition("://")
    if not sep or not head or not head.replace("+", "").replace("-", "").isalnum():
        return None
    return head.lower()


def is_remote(url: str) -> bool:
    """Whether ``url`` is a pipe or a URL rather than a local file (``file://`` is remote too)."""
    return is_pipe(url) or url_scheme(url) is not None


def check_fsspec_scheme(url: str) -> str | None:
    """Why ``url`` (a non-http URL) cannot be opened here, or None when fsspec can open it."""
    scheme = url_scheme(url)
    try:
        import fsspec
    except ImportError:
        return (
            f"{url!r} needs fsspec (and the filesystem package for {scheme}://, e.g. s3fs): "
            "pip install 'megaclip[remote]'"
        )
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as err:
        return f"{url!r}: fsspec cannot open {scheme}:// URLs here ({err})"
    return None


class PipeStream:
    """Standard output of a shell command, read as a binary stream (not seekable)."""

    def __init__(self, command: str) -> None:
        self.command = command
        # a file, not a pipe: a command that writes much to stderr cannot block on it
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            command,
            shell=True,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
        )
        assert self._proc.stdout is not None
        self._out = self._proc.stdout
        self._got = 0

    def seekable(self) -> bool:
        """Pipes cannot seek."""
        return False

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes; at the end of the output, raise if the command failed."""
        data = self._out.read(n)
        self._got += len(data)
        if not data and n != 0:
            self._check()
        return data

    def _check(self) -> None:
        rc = self._proc.wait()
        if rc == 0 and self._got:
            return
        self._stderr.seek(0)
        tail = self._stderr.read().decode("utf-8", errors="replace").strip()
        tail = " ".join(tail.split())[-_STDERR_TAIL:]
        what = f"exited with status {rc}" if rc else "printed nothing"
        raise ShardOpenError(f"command {self.command!r} {what}" + (f": {tail}" if tail else ""))

    def close(self) -> None:
        """Stop the command if it still runs (we may not read its whole output) and clean up."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._out.close()
        self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> PipeStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class HttpStream:
    """The body of an http(s) GET, read as a binary stream; errors become OSError naming the URL."""

    def __init__(self, url: str, timeout: float = _HTTP_TIMEOUT_S) -> None:
        self.url = url
        try:
            self._resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - user's spec
        except urllib.error.HTTPError as err:
            raise ShardOpenError(f"cannot fetch {url}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise ShardOpenError(f"cannot fetch {url}: {reason}") from None

    def seekable(self) -> bool:
        """Streams cannot seek."""
        return False

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the body."""
        try:
            return self._resp.read(n)
        except (http.client.HTTPException, OSError) as err:
            raise ShardOpenError(f"reading {self.url} failed: {err!r}") from None

    def close(self) -> None:
        """Close the connection."""
        self._resp.close()

    def __enter__(self) -> HttpStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_shard(url: str) -> BinaryIO:
    """A binary stream of one shard (a context manager); OSError when it cannot be opened."""
    if is_pipe(url):
        return PipeStream(url[len(PIPE_PREFIX) :].strip())  # type: ignore[return-value]
    if url.startswith(HTTP_PREFIXES):
        return HttpStream(url)  # type: ignore[return-value]
    if url_scheme(url) is not None:
        problem = check_fsspec_scheme(url)
        if problem:
            raise ShardOpenError(problem)
        import fsspec

        try:
            return fsspec.open(url, "rb").open()
        except Exception as err:  # fsspec backends raise many types for a missing object
            raise ShardOpenError(f"cannot open {url}: {err}") from None
    return open(os.path.expanduser(url), "rb", buffering=_LOCAL_BUFFER)  # noqa: SIM115
