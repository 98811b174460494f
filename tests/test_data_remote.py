"""Remote and streamed shards: ``pipe:CMD``, http(s) from a local server, fsspec URLs.

Each reads the same samples as the local files; an unreachable URL and a failing command are
skipped, counted (``unreadable_shard``; ``data_skipped`` in the metrics) and named in the
warning; a resume inside a streamed (non-seekable) shard is exact; too many failing shards stop
the run with one clear line.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import threading

import pytest

from megaclip.data.reader import WebDataset
from megaclip.data.sources import ShardOpenError, open_shard
from megaclip.data.stats import SkipStats, SkipTally, skip_record
from megaclip.data.stream import gather_state
from megaclip.errors import DataError
from tests.data_util import write_shards
from tests.mp_util import megaclip_cli, subprocess_env
from tests.test_data_resume import make_stream, take


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    """Tar indexes of the test shards go to the test's directory, not ~/.cache."""
    monkeypatch.setenv("MEGACLIP_TAR_INDEX_DIR", str(tmp_path / "tar-index"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def served(tmp_path):
    """Shards in tmp_path served by http.server on 127.0.0.1; yields (dir, base URL, keys)."""
    spec, keys = write_shards(str(tmp_path), [4, 3, 5])
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}", keys
    finally:
        server.shutdown()
        server.server_close()


def _keys(spec, **kw):
    ds = WebDataset(spec, max_skip_fraction=None, **kw)
    return [s.key for s in ds], ds.skip_stats


def test_pipe_http_and_fsspec_read_the_same_samples(served):
    d, base, keys = served
    assert _keys(f"pipe:cat {d}/shard-{{0000..0002}}.tar")[0] == keys
    got, stats = _keys(f"{base}/shard-{{0000..0002}}.tar")
    assert got == keys and stats == SkipStats(ok=12, shards_read=3)
    assert _keys(f"file://{d}/shard-{{0000..0002}}.tar")[0] == keys  # through fsspec


def test_unreachable_url_and_failing_command_are_skipped_counted_and_named(served, caplog):
    d, base, keys = served
    spec = (
        f"{base}/shard-0000.tar::{base}/missing.tar::http://127.0.0.1:9/refused.tar"
        f"::pipe:cat {d}/no-such.tar::pipe:exit 3::pipe:cat {d}/shard-0001.tar"
    )
    with caplog.at_level(logging.WARNING, logger="megaclip.data.reader"):
        got, stats = _keys(spec)
    assert got == keys[:7]
    assert stats.unreadable_shard == 4 and stats.shards_read == 2 and stats.ok == 7
    text = caplog.text
    assert f"{base}/missing.tar" in text and "HTTP 404" in text
    assert "http://127.0.0.1:9/refused.tar" in text
    assert f"command 'cat {d}/no-such.tar' exited with status 1" in text
    assert "No such file or directory" in text
    assert "command 'exit 3' exited with status 3" in text
    tally = SkipTally()
    tally.watch(type("L", (), {"skip_stats": stats})())
    rec = skip_record(tally, None)
    assert rec["data_skipped"] == 4 and rec["data_shard_errors"] == 4 and rec["data_ok"] == 7


def test_too_many_failing_shards_stop_with_one_clear_error(tmp_path):
    spec, _ = write_shards(str(tmp_path), [3])
    bad = "::".join(f"pipe:exit {i}" for i in range(1, 5))
    with pytest.raises(DataError, match=r"4 of 5 shards could not be read .* unreadable_shard=4"):
        list(WebDataset(f"{spec}::{bad}", max_skip_fraction=0.5))


def test_open_errors_name_the_source(tmp_path):
    with pytest.raises(ShardOpenError, match="printed nothing"), open_shard("pipe:true") as f:
        f.read(10)
    with pytest.raises(OSError), open_shard(str(tmp_path / "nope.tar")):
        pass


@pytest.mark.parametrize("kind", ["pipe", "http"])
def test_resume_inside_a_streamed_shard_is_exact(served, kind):
    """Non-seekable streams: the resume skips members by reading their headers."""
    d, base, _ = served
    spec = (
        f"pipe:cat {d}/shard-{{0000..0002}}.tar"
        if kind == "pipe"
        else f"{base}/shard-{{0000..0002}}.tar"
    )
    for mode in ("epoch", "resampled"):
        want = take(make_stream(spec, mode=mode, workers=0, window=3, batch=2), 12)
        for k in (1, 3, 7):
            part = make_stream(spec, mode=mode, workers=0, window=3, batch=2)
            take(part, k)
            again = make_stream(spec, mode=mode, workers=0, window=3, batch=2)
            again.load_state_dict(gather_state(part))
            assert take(again, 12 - k) == want[k:], (mode, k)


def test_cli_counts_a_failing_command_and_an_unreachable_url(served):
    """One-process `megaclip train` on http + pipe shards, one of each failing: it trains, and
    metrics.jsonl counts both in data_skipped / data_shard_errors."""
    d, base, _ = served
    from megaclip.data.photos import make_photo_shards

    photos = make_photo_shards(str(d / "p"), 24, 2, seed=0)
    local = photos.replace("{000000..000001}", "000000")
    spec = f"{base}/p/photo-000001.tar::pipe:cat {local}::{base}/p/gone.tar::pipe:cat {d}/gone.tar"
    run = d / "run"
    out = megaclip_cli(
        "train",
        "model=demo",
        "data.kind=webdataset",
        f"data.train={spec}",
        "data.mode=resampled",
        "parallel.dp=1",
        "parallel.micro_batch_size=4",
        "train.steps=4",
        "train.log_every=1",
        "data.max_skip_fraction=0.9",
        "train.tensorboard=false",
        "zeroshot.data=",
        "deepspeed=null",
        f"train.out_dir={run}",
        env=subprocess_env(),
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["data_shard_errors"] >= 1 and last["data_skipped"] >= last["data_shard_errors"]
    assert f"{base}/p/gone.tar" in out.stderr or f"cat {d}/gone.tar" in out.stderr
