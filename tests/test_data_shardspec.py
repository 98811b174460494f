"""Shard specs: brace expansion and resolution to existing files."""

from __future__ import annotations

import pytest

from megaclip.data.shardspec import expand_braces, resolve_shards, split_specs
from megaclip.errors import DataError


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("a.tar", ["a.tar"]),
        ("/d/{00..03}.tar", ["/d/00.tar", "/d/01.tar", "/d/02.tar", "/d/03.tar"]),
        ("{8..11}", ["8", "9", "10", "11"]),
        ("{008..011}", ["008", "009", "010", "011"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{0..6..3}", ["0", "3", "6"]),
        ("{a..c}", ["a", "b", "c"]),
        ("x{a,b}y{1,2}", ["xay1", "xay2", "xby1", "xby2"]),
        ("{train,val}-{0..1}.tar", ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]),
        ("{a,b{1..2}}", ["a", "b1", "b2"]),
        ("{x}", ["{x}"]),
        ("{,s}", ["", "s"]),
    ],
)
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


def test_expand_big_range_is_ordered():
    out = expand_braces("/data/{00000..00099}.tar")
    assert len(out) == 100 and out[0] == "/data/00000.tar" and out[-1] == "/data/00099.tar"


@pytest.mark.parametrize("pattern", ["a{1..2", "a}b", "{a,b}}", "{1..5..0}"])
def test_malformed_patterns(pattern):
    with pytest.raises(DataError):
        expand_braces(pattern)


def test_split_specs():
    assert split_specs("a::b :: c") == ["a", "b", "c"]
    assert split_specs(["a::b", "c"]) == ["a", "b", "c"]
    with pytest.raises(DataError, match="empty"):
        split_specs(" :: ")


def test_resolve_multiple_specs_in_order(tmp_path):
    for name in ("a-0.tar", "a-1.tar", "b-x.tar"):
        (tmp_path / name).write_bytes(b"")
    spec = f"{tmp_path}/b-{{x,y}}.tar::{tmp_path}/a-{{0..1}}.tar"
    with pytest.warns(UserWarning, match="1 of 2 shards"):
        got = resolve_shards(spec)
    assert got == [f"{tmp_path}/b-x.tar", f"{tmp_path}/a-0.tar", f"{tmp_path}/a-1.tar"]


def test_spec_matching_nothing_names_the_spec(tmp_path):
    (tmp_path / "a-0.tar").write_bytes(b"")
    bad = f"{tmp_path}/missing-{{0..3}}.tar"
    with pytest.raises(DataError, match="missing-\\{0..3\\}.tar.*matches no existing file"):
        resolve_shards(f"{tmp_path}/a-0.tar::{bad}")


def test_directory_and_remote_specs(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        resolve_shards(str(tmp_path))
    # remote specs are expanded, not checked for existence (a failing one is skipped when read)
    assert resolve_shards("pipe:aws s3 cp s3://b/{00..02}.tar -") == [
        f"pipe:aws s3 cp s3://b/{i:02d}.tar -" for i in range(3)
    ]
    assert resolve_shards("http://127.0.0.1:9/x-{0..1}.tar::https://h/y.tar") == [
        "http://127.0.0.1:9/x-0.tar",
        "http://127.0.0.1:9/x-1.tar",
        "https://h/y.tar",
    ]
    assert resolve_shards(f"file://{tmp_path}/a-{{0..1}}.tar") == [
        f"file://{tmp_path}/a-0.tar",
        f"file://{tmp_path}/a-1.tar",
    ]
    with pytest.raises(DataError, match="empty command"):
        resolve_shards("pipe: ")
    with pytest.raises(DataError, match=r"nosuchscheme://"):
        resolve_shards("nosuchscheme://bucket/{0..1}.tar")
