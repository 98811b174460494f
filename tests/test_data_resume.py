"""Sample-exact, constant-time resume of the training data stream (in process, no torchrun).

A stream is stopped after k micro-batches, its state saved (through torch.save, as in a
checkpoint) and loaded into a brand-new stream: every later batch must hold exactly the sample
keys of an uninterrupted stream, in both modes, with and without DataLoader workers, across
epoch ends, shared (sample-level split) shards, shuffle windows, corrupt samples and broken
shards. Layout changes (DP size / worker count) must neither lose nor repeat a sample of an
epoch in progress.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from megaclip.data.loader import build_webdataset_loader
from megaclip.data.position import (
    Cursor,
    ReadPoint,
    SavedRank,
    StreamId,
    Unit,
    plan_resume,
    unit_from_dict,
    unit_to_dict,
    window_order,
)
from megaclip.data.stream import SyntheticStream, TrainStream, gather_state
from megaclip.data.synthetic import SyntheticConfig, synthetic_batches
from megaclip.data.writer import ShardWriter
from tests.data_util import caption_of, fake_tokenizer, tiny_image, write_shards


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    """Tar indexes of the test shards go to the test's directory, not ~/.cache."""
    monkeypatch.setenv("MEGACLIP_TAR_INDEX_DIR", str(tmp_path / "tar-index"))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    tiny_image(i, (9, 7)).save(buf, format="PNG")
    return buf.getvalue()


def messy_shards(d: str) -> str:
    """5 shards of uneven size; shard 1 has corrupt samples, shard 3 is cut short."""
    sizes = [7, 9, 5, 8, 6]
    idx = 0
    for j, n in enumerate(sizes):
        with ShardWriter(os.path.join(d, "m-%04d.tar"), max_count=n, start_index=j) as w:
            for _ in range(n):
                key = f"k{idx:05d}"
                if j == 1 and idx % 3 == 0:
                    w.write_raw(key, {"png": b"\x89PNG broken", "txt": caption_of(idx).encode()})
                elif j == 1 and idx % 4 == 1:
                    w.write_raw(key, {"png": _png(idx)})  # no caption
                else:
                    w.write_raw(key, {"png": _png(idx), "txt": caption_of(idx).encode()})
                idx += 1
    cut = Path(d) / "m-0003.tar"
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"k00026.png") + 700])
    return os.path.join(d, "m-{0000..0004}.tar")


def make_stream(spec, *, mode, workers, dp_rank=0, dp_size=1, window=4, batch=3):
    loader = build_webdataset_loader(
        spec,
        fake_tokenizer,
        8,
        batch,
        dp_rank,
        dp_size,
        workers,
        mode=mode,
        seed=5,
        train=True,
        shuffle_buffer=window,
        max_skip_fraction=None,
    )
    return TrainStream(loader, "no batch")


def take(stream, n):
    out = []
    for _ in range(n):
        _, tokens = next(stream)
        out.append([int(i) - 1 for i in tokens[:, 0]])
        assert len(stream.loader.last_keys) == len(out[-1])
    return out


def saved(stream, tmp_path):
    """The stream's state through torch.save / torch.load (as a checkpoint stores it)."""
    path = tmp_path / "state.pt"
    torch.save(gather_state(stream), path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_exactly_the_same_samples(tmp_path, mode, workers):
    spec = messy_shards(str(tmp_path))
    total = 34  # several epochs of ~28 usable samples / 3 per batch
    whole = make_stream(spec, mode=mode, workers=workers)
    want = take(whole, total)
    want_stats = whole.skip_stats
    assert want_stats.skipped > 0 and want_stats.shard_errors > 0
    if mode == "epoch":
        assert whole.epoch >= 2
    for k in (1, 4, 9, 17, 26):
        first = make_stream(spec, mode=mode, workers=workers)
        assert take(first, k) == want[:k]
        state = saved(first, tmp_path)
        again = make_stream(spec, mode=mode, workers=workers)
        again.load_state_dict(state)
        assert take(again, total - k) == want[k:], f"resumed after {k} batches"
        assert again.skip_stats == want_stats, f"counts after resuming at {k}"
        assert again.batches == total


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_of_two_dp_ranks_with_workers(tmp_path, mode):
    spec = messy_shards(str(tmp_path))
    for rank in range(2):
        whole = make_stream(spec, mode=mode, workers=2, dp_rank=rank, dp_size=2, batch=2)
        want = take(whole, 20)
        part = make_stream(spec, mode=mode, workers=2, dp_rank=rank, dp_size=2, batch=2)
        take(part, 7)
        state = {"ranks": [None, None]}
        state["ranks"][rank] = part.state_dict()
        other = make_stream(spec, mode=mode, workers=2, dp_rank=1 - rank, dp_size=2, batch=2)
        state["ranks"][1 - rank] = other.state_dict()
        again = make_stream(spec, mode=mode, workers=2, dp_rank=rank, dp_size=2, batch=2)
        again.load_state_dict(state)
        assert take(again, 13) == want[7:]


def test_resume_reads_one_window_not_the_stream(tmp_path, monkeypatch):
    """O(1): resuming late in a shard opens only the shard of the position (seeks by index)
    and reads about one window of samples, however far into the stream the position is."""
    spec, _ = write_shards(str(tmp_path), [200, 200])
    whole = make_stream(spec, mode="epoch", workers=0, window=8, batch=4)
    take(whole, 80)  # 320 samples in: deep inside the second shard
    state = gather_state(whole)
    import megaclip.data.tarindex as ti

    loaded = []
    real = ti.iter_groups

    def counting(*args, **kwargs):
        for g in real(*args, **kwargs):
            loaded.append(g[2] is not None)
            yield g

    monkeypatch.setattr("megaclip.data.reader.iter_groups", counting)
    again = make_stream(spec, mode="epoch", workers=0, window=8, batch=4)
    again.load_state_dict(state)
    take(again, 2)
    assert len(loaded) <= 16, len(loaded)  # the re-read window + the next one


def test_stale_index_is_rebuilt(tmp_path):
    spec, _ = write_shards(str(tmp_path), [30])
    path = str(tmp_path / "shard-0000.tar")
    s1 = make_stream(spec, mode="epoch", workers=0, window=4, batch=2)
    take(s1, 6)
    state = gather_state(s1)
    import megaclip.data.tarindex as ti

    index = ti.shard_index(path)
    bogus = ti.TarIndex(
        index.size,
        index.mtime_ns,
        tuple(o + 512 for o in index.offsets),
        index.keys,
        index.end,
        None,
    )
    ti._MEMO[path] = bogus  # a stale index that still matches size and mtime
    want = take(make_stream(spec, mode="epoch", workers=0, window=4, batch=2), 12)[6:]
    again = make_stream(spec, mode="epoch", workers=0, window=4, batch=2)
    again.load_state_dict(state)
    assert take(again, 6) == want


def test_layout_change_in_epoch_mode_neither_loses_nor_repeats(tmp_path, capsys):
    """Saved with dp=2 x 2 workers mid-epoch; resumed on dp=1 x 0 workers and dp=3 x 1: the
    rest of the epoch holds exactly the samples the saved run had not yet used."""
    spec, keys = write_shards(str(tmp_path), [9, 7, 8, 6, 10])
    streams = [
        make_stream(spec, mode="epoch", workers=2, dp_rank=r, dp_size=2, batch=2) for r in range(2)
    ]
    used = [s for b in take(streams[0], 5) + take(streams[1], 3) for s in b]
    state = {"ranks": [s.state_dict() for s in streams]}
    for dp_size, workers in ((1, 0), (3, 1)):
        rest = []
        for rank in range(dp_size):
            s = make_stream(
                spec, mode="epoch", workers=workers, dp_rank=rank, dp_size=dp_size, batch=2
            )
            s.load_state_dict(state)
            while True:
                batch = take(s, 1)[0]
                if s.epoch != 0:  # the batch is the next epoch's first
                    break
                rest.extend(batch)
        got = Counter(used + rest)
        assert max(got.values()) == 1, "a sample was repeated"
        # each new consumer drops at most its last partial batch (drop_last), nothing else
        assert len(keys) - len(got) <= dp_size * max(1, workers) * (2 - 1)
    assert "finished exactly (no sample lost or repeated)" in capsys.readouterr().err


def test_plan_resume_is_pure_and_covers_every_outstanding_stream():
    u = lambda e, c, n: Unit(StreamId(e, c, n))  # noqa: E731
    saved = [
        SavedRank(0, 2, 1, 3, 0, ((Unit(StreamId(3, 0, 2), Cursor(2, 1, ReadPoint(1, 4))),),), 0),
        SavedRank(1, 2, 1, 4, 0, (None,), 0),
    ]
    plans = [plan_resume(saved, "epoch", r, 3, 1) for r in range(3)]
    streams = sorted(
        (x.stream.epoch, x.stream.consumer) for p in plans for w in p.workers for x in w
    )
    # rank 0 owes the rest of epoch 3 and all of epoch 4; rank 1 all of epoch 4
    assert streams == [(3, 0), (4, 0), (4, 1)]
    assert all(p.epoch == 4 and p.generation == 1 for p in plans)
    same = plan_resume(saved, "epoch", 1, 2, 1)
    assert same.note is None and same.workers == (None,) and same.epoch == 4
    res = [SavedRank(r, 2, 1, 0, 0, ((u(0, r, 2),),), 0) for r in range(2)]
    p = plan_resume(res, "resampled", 0, 1, 3)
    assert [w[0].stream for w in p.workers] == [
        StreamId(0, 0, 2),
        StreamId(0, 1, 2),
        StreamId(0, 2, 3, 1),
    ]
    assert "start new streams" in p.note
    unit = Unit(StreamId(1, 2, 4, 1), Cursor(3, 2, ReadPoint(5, 6, 7), 8, "a/k", ((1, 2),)))
    assert unit_from_dict(unit_to_dict(unit)) == unit
    assert sorted(window_order("t", 3, 10)) == list(range(10))
    assert window_order("t", 3, 10) == window_order("t", 3, 10) != window_order("t", 4, 10)


def test_changed_settings_restart_the_epoch_with_a_message(tmp_path, capsys):
    spec, _ = write_shards(str(tmp_path), [6, 6])
    s = make_stream(spec, mode="epoch", workers=0)
    take(s, 2)
    state = gather_state(s)
    other = make_stream(spec, mode="epoch", workers=0, window=2)
    other.load_state_dict(state)
    assert other.epoch == 1
    assert "data settings changed" in capsys.readouterr().err


def test_synthetic_stream_resumes_and_matches_synthetic_batches():
    cfg = SyntheticConfig(2, 4, 6, vocab_size=50, sot_id=48, eot_id=49, seed=3)
    ref = synthetic_batches(cfg)
    s = SyntheticStream(cfg, dp_rank=0)
    for _ in range(3):
        a, b = next(ref), next(s)
        assert torch.equal(a[1], b[1])
    state = gather_state(s)
    t = SyntheticStream(cfg, dp_rank=0)
    assert t.load_state_dict(state)
    assert torch.equal(next(t)[1], next(ref)[1])
    assert not SyntheticStream(cfg, dp_rank=1).load_state_dict(state)


def test_tar_member_offsets_and_index(tmp_path):
    from megaclip.data.tarindex import build_index, shard_index

    spec, keys = write_shards(str(tmp_path), [5])
    path = str(tmp_path / "shard-0000.tar")
    index = build_index(path)
    assert index.keys == tuple(keys) and index.error is None
    with tarfile.open(path) as tf:
        first = {m.name.split(".")[0]: m.offset for m in tf.getmembers()[::-1]}
    assert index.offsets == tuple(first[k] for k in keys)
    assert shard_index(path) == index


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_index_offsets_include_extended_headers(tmp_path, fmt):
    """Long member names (GNU 'L' / pax 'x' headers): a group starts at its extended header."""
    from megaclip.data.tarindex import build_index

    path = tmp_path / "long.tar"
    depth = 1 if fmt == tarfile.USTAR_FORMAT else 2
    with tarfile.open(path, "w", format=fmt) as tf:
        for i in range(4):
            for ext in ("txt", "png"):
                info = tarfile.TarInfo(("d" * 60 + "/") * depth + f"k{i}.{ext}")
                info.size = 100 + i
                tf.addfile(info, io.BytesIO(b"x" * info.size))
    with tarfile.open(path) as tf:
        first: dict[str, int] = {}
        for m in tf.getmembers():
            first.setdefault(m.name.rsplit(".", 1)[0], m.offset)
    index = build_index(str(path))
    assert index.offsets == tuple(first.values()) and index.keys == tuple(first)
