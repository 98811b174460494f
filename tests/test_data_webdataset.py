"""Webdataset shards: round trip, tar formats, DP x worker splitting, resampling, skip policy."""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from megaclip.data.tario import TarReadError, iter_tar
from megaclip.data.webdataset import (
    EpochPlan,
    ShardWriter,
    SkipStats,
    WebDataset,
    count_groups,
    plan_epoch_shards,
    split_name,
)
from megaclip.errors import ConfigError, DataError
from tests.data_util import caption_of, tiny_image, write_shards


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_images_captions_meta(tmp_path):
    spec, keys = write_shards(str(tmp_path), [4, 3])
    ds = WebDataset(spec, decode_json=True)
    samples = list(ds)
    assert [s.key for s in samples] == keys
    for i, s in enumerate(samples):
        assert s.caption == caption_of(i)
        assert s.meta == {"i": i}
        assert np.array_equal(np.asarray(s.image.convert("RGB")), np.asarray(tiny_image(i)))
    assert ds.skip_stats == SkipStats(ok=7, shards_read=2)


def test_round_trip_jpeg_bytes_and_webp(tmp_path):
    jpg = io.BytesIO()
    tiny_image(3, (16, 16)).save(jpg, format="JPEG", quality=95)
    with ShardWriter(str(tmp_path / "s-%03d.tar"), max_count=10) as w:
        w.write("a", jpg.getvalue(), "jpeg bytes")  # extension sniffed from the bytes
        w.write("b", tiny_image(4), "webp image", image_ext="webp")
    got = {s.key: s for s in WebDataset(str(tmp_path / "s-000.tar"))}
    assert got["a"].image.format == "JPEG" and got["a"].image.size == (16, 16)
    assert got["b"].image.format == "WEBP" and got["b"].caption == "webp image"


def test_writer_splits_shards_and_is_deterministic(tmp_path):
    for sub in ("x", "y"):
        with ShardWriter(str(tmp_path / sub / "t-{:02d}.tar"), max_count=3) as w:
            for i in range(7):
                w.write(f"k{i}", tiny_image(i), caption_of(i))
        assert [os.path.basename(p) for p in w.shards] == ["t-00.tar", "t-01.tar", "t-02.tar"]
        assert w.count == 7
    for name in ("t-00.tar", "t-02.tar"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()
    assert [count_groups(str(tmp_path / "x" / n))[0] for n in ("t-00.tar", "t-02.tar")] == [3, 1]
    assert not list(tmp_path.glob("*/*.tmp"))


def test_writer_rejects_bad_keys_and_patterns(tmp_path):
    with pytest.raises(ConfigError, match="no index field"):
        ShardWriter(str(tmp_path / "fixed.tar"))
    w = ShardWriter(str(tmp_path / "w-%d.tar"))
    with pytest.raises(DataError, match="invalid"):
        w.write("a.b", tiny_image(0), "x")
    with pytest.raises(DataError, match="not PNG"):
        w.write("a", b"garbage", "x")
    w.close()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_formats_long_names_and_dirs(tmp_path, fmt):
    """Reader agrees with Python's tarfile for GNU long names, pax paths, ustar prefixes, dirs."""
    path = tmp_path / "f.tar"
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 chars: prefix field / long-name / pax path
    names = [f"{long_dir}/sample{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
    with tarfile.open(path, "w", format=fmt) as tf:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        for n in names:
            data = _png(tiny_image(1)) if n.endswith("png") else n.encode()
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with open(path, "rb") as f:
        got = list(iter_tar(f))
    assert [n for n, _ in got] == names
    assert got[1][1] == names[1].encode()
    samples = list(WebDataset(str(path)))
    assert [s.key for s in samples] == [f"{long_dir}/sample{i}" for i in range(3)]


def test_split_name_conventions():
    assert split_name("a/b/key.seg.jpg") == ("a/b/key", "seg.jpg")
    assert split_name("KEY.JPG") == ("KEY", "jpg")
    assert split_name("README") is None
    assert split_name("dir/.hidden") is None


def _all_keys(spec, dp_size, workers, *, shuffle, epoch=0, seed=3):
    """Keys seen by every (rank, worker) consumer, through iter_samples (no processes)."""
    seen = []
    for rank in range(dp_size):
        ds = WebDataset(spec, dp_rank=rank, dp_size=dp_size, seed=seed, shuffle_shards=shuffle)
        ds.set_epoch(epoch)
        for w in range(max(1, workers)):
            seen.extend(s.key for s in ds.iter_samples(w, max(1, workers)) if s is not None)
    return seen


@pytest.mark.parametrize("sizes", [[5], [5, 4, 3, 5], [3, 3, 3, 3, 3, 2, 4]])
@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_epoch_mode_every_sample_exactly_once(tmp_path, sizes, dp_size, workers):
    """1, 4 and 7 shards over 1..6 consumers: shard-level, sample-level and mixed splits."""
    spec, keys = write_shards(str(tmp_path), sizes)
    for epoch, shuffle in ((0, False), (1, True)):
        seen = _all_keys(spec, dp_size, workers, shuffle=shuffle, epoch=epoch)
        assert Counter(seen) == Counter(keys), (dp_size, workers, epoch)


def test_epoch_mode_real_dataloader_workers(tmp_path):
    """Through torch's DataLoader (get_worker_info), 3 DP ranks x 2 workers, 4 shards."""
    spec, keys = write_shards(str(tmp_path), [3, 2, 3, 2])
    seen = []
    per_rank = []
    for rank in range(3):
        ds = WebDataset(spec, dp_rank=rank, dp_size=3, shuffle_shards=True, seed=1)
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda s: s.key)
        got = list(loader)
        per_rank.append(set(got))
        seen.extend(got)
    assert Counter(seen) == Counter(keys)
    assert all(per_rank)  # every rank got something


def test_epoch_shard_order_changes_with_epoch(tmp_path):
    spec, _ = write_shards(str(tmp_path), [2] * 6)
    ds = WebDataset(spec, shuffle_shards=True, seed=0)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        orders.append([s.key for s in ds])
    assert orders[0] != orders[1] or orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])
    ds.set_epoch(1)
    assert [s.key for s in ds] == orders[1]  # deterministic given (seed, epoch)


@settings(max_examples=60, deadline=None)
@given(
    num_shards=st.integers(0, 40),
    num_consumers=st.integers(1, 12),
    seed=st.integers(0, 5),
    shuffle=st.booleans(),
)
def test_plan_partitions_shards(num_shards, num_consumers, seed, shuffle):
    plans = [
        plan_epoch_shards(num_shards, num_consumers, c, seed, 0, shuffle)
        for c in range(num_consumers)
    ]
    whole = [i for p in plans for i in p.whole]
    assert len(whole) == len(set(whole))
    assert len(plans[0].shared) == num_shards % num_consumers
    assert all(p.shared == plans[0].shared for p in plans)
    assert sorted(whole + list(plans[0].shared)) == list(range(num_shards))
    assert len({len(p.whole) for p in plans}) == 1  # shard-level part is balanced


def test_plan_rejects_bad_consumer():
    assert isinstance(plan_epoch_shards(4, 2, 1, 0, 0, False), EpochPlan)
    with pytest.raises(ConfigError):
        plan_epoch_shards(4, 2, 2, 0, 0, False)


def _take(ds, n, worker=0, num_workers=1):
    out = []
    for s in ds.iter_samples(worker, num_workers):
        out.append(s.key)
        if len(out) == n:
            return out
    raise AssertionError("resampled stream ended")


def test_resampled_deterministic_and_differs_across_ranks(tmp_path):
    spec, keys = write_shards(str(tmp_path), [3] * 8)

    def stream(rank, seed, epoch=0, worker=0):
        ds = WebDataset(spec, mode="resampled", dp_rank=rank, dp_size=2, seed=seed)
        ds.set_epoch(epoch)
        return _take(ds, 60, worker, 2)

    a = stream(0, seed=5)
    assert a == stream(0, seed=5)
    assert a != stream(1, seed=5)
    assert a != stream(0, seed=6)
    assert a != stream(0, seed=5, epoch=1)
    assert a != stream(0, seed=5, worker=1)
    assert set(a) <= set(keys) and len(set(a)) > 3
    assert max(Counter(a).values()) > 1  # 60 draws from 24 samples: with replacement


def test_resampled_all_empty_shards_fails_instead_of_spinning(tmp_path):
    for i in range(2):
        with tarfile.open(tmp_path / f"e{i}.tar", "w"):  # valid tar without members
            pass
    ds = WebDataset(f"{tmp_path}/e{{0..1}}.tar", mode="resampled")
    with pytest.raises(DataError, match="16 shard draws in a row gave no sample"):
        next(iter(ds))


def _corrupt_shard(tmp_path):
    """A shard with 10 good samples and one of each bad kind, interleaved."""
    good = _png(tiny_image(9))
    big = _png(Image.new("RGB", (64, 64)))  # 4096 px > the limit used below
    with ShardWriter(str(tmp_path / "c-%02d.tar"), max_count=100) as w:
        n = 0

        def ok():
            nonlocal n
            w.write_raw(f"good{n}", {"png": good, "txt": f"fine {n}".encode()})
            n += 1

        ok()
        w.write_raw("zero", {"jpg": b"", "txt": b"zero-byte image"})
        ok()
        w.write_raw("garbage", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"garbage"})
        w.write_raw("cut", {"png": good[: len(good) // 2], "txt": b"truncated png"})
        ok()
        w.write_raw("nocap", {"png": good, "json": b"{}"})
        w.write_raw("emptycap", {"png": good, "txt": b"   "})
        ok()
        w.write_raw("noimg", {"txt": b"caption only"})
        w.write_raw("latin1", {"png": good, "txt": "caf\xe9".encode("latin-1")})
        w.write_raw("bomb", {"png": big, "txt": b"too many pixels"})
        for _ in range(6):
            ok()
    return str(tmp_path / "c-00.tar")


EXPECTED_BAD = {
    "empty_image": 1,
    "undecodable_image": 2,
    "missing_caption": 2,
    "missing_image": 1,
    "bad_caption_encoding": 1,
    "image_too_large": 1,
}


def test_bad_samples_skipped_and_counted(tmp_path):
    path = _corrupt_shard(tmp_path)
    ds = WebDataset(path, max_image_pixels=1000, max_skip_fraction=None)
    keys = [s.key for s in ds]
    assert keys == [f"good{i}" for i in range(10)]
    assert ds.skip_stats.reasons() == EXPECTED_BAD
    assert ds.skip_stats.ok == 10 and ds.skip_stats.skipped == 8 and ds.skip_stats.shards_read == 1


def test_skip_threshold_raises_dataerror_naming_reasons(tmp_path):
    path = _corrupt_shard(tmp_path)
    ds = WebDataset(path, max_image_pixels=1000, max_skip_fraction=0.3, skip_check_min_samples=5)
    with pytest.raises(DataError, match=r"max_skip_fraction=0\.3.*empty_image=1"):
        list(ds)
    # 8 of 18 skipped = 44%: under 0.5 it passes, including the end-of-epoch check
    assert len(list(WebDataset(path, max_image_pixels=1000, max_skip_fraction=0.5))) == 10


def test_all_bad_is_fatal_at_end(tmp_path):
    with ShardWriter(str(tmp_path / "b-%d.tar")) as w:
        w.write_raw("x", {"txt": b"no image"})
    with pytest.raises(DataError, match="missing_image=1"):
        list(WebDataset(str(tmp_path / "b-0.tar"), max_skip_fraction=None))


def test_truncated_and_corrupt_tars_stop_that_shard_only(tmp_path):
    spec, keys = write_shards(str(tmp_path), [4, 4, 4])
    second = tmp_path / "shard-0001.tar"
    data = second.read_bytes()
    cut = data.index(b"k00006.txt")  # inside the header of the 3rd sample's caption
    second.write_bytes(data[: cut + 100])
    third = tmp_path / "shard-0002.tar"
    raw = bytearray(third.read_bytes())
    hdr = raw.index(b"k00010.png")  # 3rd sample of shard 3: break its header checksum
    raw[hdr + 150] ^= 0x5A
    third.write_bytes(bytes(raw))
    ds = WebDataset(spec, max_skip_fraction=None)
    got = [s.key for s in ds]
    # the group in progress when a shard breaks is dropped (it may be incomplete)
    assert got == keys[:4] + keys[4:6] + keys[8:9]
    st_ = ds.skip_stats
    assert (st_.truncated_tar, st_.corrupt_tar, st_.shards_read, st_.ok) == (1, 1, 1, 7)
    with pytest.raises(TarReadError), open(second, "rb") as f:
        list(iter_tar(f))


def test_tar_cut_at_member_boundary_counts_as_truncated(tmp_path):
    spec, keys = write_shards(str(tmp_path), [3])
    p = tmp_path / "shard-0000.tar"
    data = p.read_bytes()
    end = len(data)
    while data[end - 512 : end] == bytes(512):  # strip the end-of-archive zero blocks
        end -= 512
    p.write_bytes(data[:end])
    ds = WebDataset(spec, max_skip_fraction=None)
    assert [s.key for s in ds] == keys[:2]  # last group dropped: it may be incomplete
    assert ds.skip_stats.truncated_tar == 1


def test_skips_in_shared_shards_counted_once(tmp_path):
    """Sample-level split (1 shard, 2x2 consumers): each bad sample counted by exactly one."""
    path = _corrupt_shard(tmp_path)
    total = SkipStats()
    for rank in range(2):
        ds = WebDataset(
            path, dp_rank=rank, dp_size=2, max_image_pixels=1000, max_skip_fraction=None
        )
        for w in range(2):
            stats = SkipStats()
            list(ds.iter_samples(w, 2, stats=stats, check=False))
            total = total + stats
    assert total.reasons() == EXPECTED_BAD and total.ok == 10 and total.shards_read == 1


def test_unreadable_shard_counted(tmp_path):
    """A shard that disappears (or cannot be opened) after the spec was resolved."""
    spec, keys = write_shards(str(tmp_path), [2, 2])
    ds = WebDataset(spec, max_skip_fraction=None)
    os.remove(tmp_path / "shard-0001.tar")
    assert [s.key for s in ds] == keys[:2]
    assert ds.skip_stats.unreadable_shard == 1 and ds.skip_stats.shards_read == 1


def test_invalid_arguments():
    with pytest.raises(ConfigError, match="mode"):
        WebDataset("x.tar", mode="forever")
    with pytest.raises(ConfigError, match="dp_rank"):
        WebDataset("x.tar", dp_rank=2, dp_size=2)
