"""build_webdataset_loader: batches, drop_last, len, workers, skip statistics, threshold."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from PIL import Image

from megaclip.data.loader import build_webdataset_loader
from megaclip.data.webdataset import ShardWriter
from megaclip.errors import DataError
from tests.data_util import caption_of, fake_tokenizer, write_shards


def _ids(batches):
    return [int(i) - 1 for _, tokens in batches for i in tokens[:, 0]]


def test_eval_loader_batches_and_len(tmp_path):
    spec, keys = write_shards(str(tmp_path), [5, 4])
    loader = build_webdataset_loader(spec, fake_tokenizer, 8, 4, train=False)
    batches = list(loader)
    images, tokens = batches[0]
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert tokens.shape == (4, 77) and tokens.dtype == torch.int64
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]  # eval keeps the partial batch
    assert len(loader) == 3
    assert _ids(batches) == list(range(9))  # eval: spec order, no shuffling
    assert tokens[0, 1] == len(caption_of(0))
    st = loader.skip_stats
    assert st.ok == 9 and st.skipped == 0 and st.shards_read == 2


@pytest.mark.parametrize(("dp_size", "workers"), [(1, 2), (2, 2), (3, 0)])
def test_eval_loader_sees_every_sample_once_across_ranks(tmp_path, dp_size, workers):
    spec, keys = write_shards(str(tmp_path), [4, 3, 5, 2, 3])
    ids = []
    for rank in range(dp_size):
        loader = build_webdataset_loader(
            spec, fake_tokenizer, 8, 3, rank, dp_size, workers, train=False
        )
        batches = list(loader)
        assert len(loader) == len(batches)  # exact for clean shards
        ids.extend(_ids(batches))
    assert Counter(ids) == Counter(range(len(keys)))


def test_train_loader_drop_last_shuffle_epochs(tmp_path):
    spec, keys = write_shards(str(tmp_path), [6, 6, 6])
    loader = build_webdataset_loader(spec, fake_tokenizer, 8, 4, workers=0, train=True, seed=3)
    first = list(loader)
    assert all(b[0].shape[0] == 4 for b in first) and len(first) == 4  # 18 // 4, drop_last
    assert len(loader) == 4
    again = list(loader)
    assert _ids(first) == _ids(again)  # same epoch, same seed: same order and crops
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    loader.set_epoch(1)
    second = list(loader)
    assert _ids(first) != _ids(second)
    assert _ids(first) != sorted(_ids(first))  # shuffled


def test_resampled_loader_is_infinite(tmp_path):
    spec, _ = write_shards(str(tmp_path), [3, 3])
    loader = build_webdataset_loader(
        spec, fake_tokenizer, 8, 4, mode="resampled", workers=2, train=True
    )
    it = iter(loader)
    got = [next(it) for _ in range(5)]  # 20 samples from 6: must wrap around
    assert all(b[0].shape == (4, 3, 8, 8) for b in got)
    with pytest.raises(TypeError):
        len(loader)


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def test_loader_skip_stats_over_workers_and_threshold(tmp_path):
    with ShardWriter(str(tmp_path / "m-%02d.tar"), max_count=10) as w:
        for i in range(20):
            if i % 5 == 0:
                w.write_raw(f"k{i}", {"png": b"", "txt": caption_of(i).encode()})
            elif i % 5 == 1:
                w.write_raw(f"k{i}", {"png": _png((i, 0, 0))})
            else:
                w.write_raw(f"k{i}", {"png": _png((i, 0, 0)), "txt": caption_of(i).encode()})
    spec = str(tmp_path / "m-{00..01}.tar")
    loader = build_webdataset_loader(spec, fake_tokenizer, 4, 2, workers=2, train=False)
    ids = _ids(list(loader))
    assert sorted(ids) == [i for i in range(20) if i % 5 > 1]
    st = loader.skip_stats
    assert (st.ok, st.empty_image, st.missing_caption, st.shards_read) == (12, 4, 4, 2)
    strict = build_webdataset_loader(
        spec,
        fake_tokenizer,
        4,
        2,
        workers=2,
        train=False,
        max_skip_fraction=0.2,
        skip_check_min_samples=4,
    )
    with pytest.raises(DataError, match=r"above max_skip_fraction=0\.2: .*empty_image=") as err:
        list(strict)
    assert "Traceback" not in str(err.value)  # raised in the main process, not re-raised


def test_bad_tokenizer_output(tmp_path):
    spec, _ = write_shards(str(tmp_path), [3])
    loader = build_webdataset_loader(
        spec, lambda caps: torch.zeros(77, dtype=torch.long), 8, 2, train=False
    )
    with pytest.raises(DataError, match="tokenizer returned shape"):
        list(loader)
