"""Bad run configs fail with one MegaclipError before any process group (property-based).

Every input goes through the real pre-checks of ``run_training`` (config loading, DeepSpeed JSON
resolution, world size, tokenizer, shards, zero-shot files, output dir); ``init_distributed`` is
replaced by a tripwire, so an input either raises a MegaclipError or reaches the tripwire.
Anything else (TypeError, AttributeError, ValueError, ...) is a defect: the CLI would print a
traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import megaclip.train.loop as loop
from megaclip.config.model import ClipConfig, TextConfig, VisionConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import (
    DataConfig,
    OptimConfig,
    TrainSection,
    ZeroShotSection,
    load_run_config,
    run_config_from_dict,
)
from megaclip.errors import ConfigError, MegaclipError
from tests.tripwire import ReachedProcessGroups, stop_before_process_groups

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def tripwire(monkeypatch, tmp_path):
    """run_training stops where process groups would be created; WORLD_SIZE=1; cwd=tmp."""
    stop_before_process_groups(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def precheck(data: dict | None = None, *, path=None, overrides=(), ds=None) -> str:
    """'ok' if the input passes every pre-check, 'error' if it raised a MegaclipError."""
    try:
        if data is not None:
            cfg = run_config_from_dict(data)
        else:
            cfg = load_run_config(path, list(overrides))
        loop.run_training(cfg, ds)
    except MegaclipError as err:
        assert str(err).strip(), "a MegaclipError must carry a message"
        assert "\n" not in str(err).strip() or len(str(err)) < 2000
        return "error"
    except ReachedProcessGroups:
        return "ok"
    raise AssertionError("run_training returned without creating process groups")


def base() -> dict:
    """A valid config: tiny model, synthetic data, one process."""
    return {
        "model": "tiny",
        "parallel": {"dp": 1, "micro_batch_size": 4},
        "data": {"kind": "synthetic"},
        "optim": {"lr": 1e-3},
        "train": {"steps": 3, "out_dir": "run"},
        "zeroshot": {},
        "deepspeed": None,
    }


def field_paths() -> list[tuple[str, ...]]:
    """Every settable path of a run config (sections, their fields, model tower fields)."""
    paths: list[tuple[str, ...]] = [("model",), ("deepspeed",)]
    sections = {
        "parallel": ParallelConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainSection,
        "zeroshot": ZeroShotSection,
    }
    for name, cls in sections.items():
        paths.append((name,))
        paths += [(name, f.name) for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(ClipConfig):
        if f.name not in ("vision", "text"):
            paths.append(("model", f.name))
    paths += [("model", "vision", f.name) for f in dataclasses.fields(VisionConfig)]
    paths += [("model", "text", f.name) for f in dataclasses.fields(TextConfig)]
    return paths


PATHS = field_paths()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 2, 3, 7, 64, 10**9, -(10**9)]),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["", "auto", "fp16", "bf16", "tiny", "demo", "x" * 300, "a\x00b", "../..", "-1"]
    ),
    st.text(max_size=12),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
)


def set_path(data: dict, path: tuple[str, ...], value) -> dict:
    """Copy of ``data`` with ``path`` set (model tower paths turn the model into a mapping)."""
    out = copy.deepcopy(data)
    if path[0] == "model" and len(path) > 1:
        out["model"] = {"preset": "tiny"}
    node = out
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return out


def test_the_base_config_passes(tripwire):
    assert precheck(base()) == "ok"


@SETTINGS
@given(path=st.sampled_from(PATHS), value=values)
def test_any_single_field_value_passes_or_raises_megaclip_error(tripwire, path, value):
    precheck(set_path(base(), path, value))  # either outcome; anything else raises


@SETTINGS
@given(
    changes=st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=2, max_size=5),
)
def test_several_random_fields_pass_or_raise_megaclip_error(tripwire, changes):
    data = base()
    for path, value in changes:
        data = set_path(data, path, value)
    precheck(data)


@SETTINGS
@given(
    section=st.sampled_from(["", "parallel", "data", "optim", "train", "zeroshot"]),
    key=st.text(min_size=1, max_size=12),
    value=scalars,
)
def test_unknown_keys_are_config_errors(tripwire, section, key, value):
    data = base()
    node = data if not section else data[section]
    if key in node or (not section and key in ("model", "deepspeed")):
        return
    valid = {
        f.name for f in dataclasses.fields(loop.RunConfig if not section else type_of(section))
    }
    if key in valid:
        return
    node[key] = value
    with pytest.raises(ConfigError, match="unknown key"):
        run_config_from_dict(data)


def type_of(section: str) -> type:
    return {
        "parallel": ParallelConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainSection,
        "zeroshot": ZeroShotSection,
    }[section]


MALFORMED = [
    "model: tiny\nparallel: {dp: 1\n",
    "model: [tiny\n",
    "parallel:\n  dp: 1\n   tp: 2\n",
    "- a\n- b\n",
    "model: tiny\ntrain: 3\n",
    "\t model: tiny",
    "%YAML 9.9\n---\nmodel: tiny\n",
    "!!python/object:os.system {}",
    "a: &x {b: *x}",
]
# YAML flow mappings: valid YAML (so they may pass as .yaml), not valid JSON
FLOW = ["{'model': 'tiny'}", '{"model": "tiny", "parallel": {"dp": 1},}']


@SETTINGS
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.sampled_from(MALFORMED + FLOW),
    ),
    suffix=st.sampled_from([".yaml", ".json", ".yml", ""]),
)
def test_random_config_text_passes_or_raises_megaclip_error(tripwire, text, suffix):
    path = tripwire / f"cfg{suffix}"
    path.write_text(text, encoding="utf-8")
    precheck(path=path, overrides=["parallel.dp=1", "data.kind=synthetic"])  # either outcome


@pytest.mark.parametrize("suffix", [".yaml", ".json", ""])
@pytest.mark.parametrize("text", MALFORMED, ids=repr)
def test_malformed_config_text_raises_megaclip_error(tripwire, text, suffix):
    path = tripwire / f"cfg{suffix}"
    path.write_text(text, encoding="utf-8")
    assert precheck(path=path, overrides=["parallel.dp=1", "data.kind=synthetic"]) == "error"


@pytest.mark.parametrize("text", FLOW, ids=repr)
def test_yaml_flow_mapping_is_not_json(tripwire, text):
    path = tripwire / "cfg.json"
    path.write_text(text, encoding="utf-8")
    assert precheck(path=path, overrides=["parallel.dp=1", "data.kind=synthetic"]) == "error"


@SETTINGS
@given(
    overrides=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(
                lambda p, v: ".".join(p) + "=" + v,
                st.sampled_from(PATHS),
                st.one_of(st.text(max_size=10), st.sampled_from(["[1, 2", "{a: 1}", "null", "-3"])),
            ),
        ),
        max_size=4,
    )
)
def test_random_overrides_pass_or_raise_megaclip_error(tripwire, overrides):
    path = tripwire / "base.yaml"
    path.write_text(json.dumps(base()), encoding="utf-8")
    precheck(path=path, overrides=overrides)


DS_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "zero_optimization",
    "optimizer",
    "scheduler",
    "gradient_clipping",
    "steps_per_print",
    "activation_checkpointing",
    "wall_clock_breakdown",
)
ds_values = st.one_of(
    scalars,
    st.fixed_dictionaries({"enabled": scalars}),
    st.fixed_dictionaries({"stage": scalars}),
    st.dictionaries(st.sampled_from(["enabled", "stage", "loss_scale", "type"]), scalars),
    st.lists(scalars, max_size=2),
)


@SETTINGS
@given(ds=st.dictionaries(st.sampled_from(DS_KEYS), ds_values, max_size=5))
def test_deepspeed_json_with_random_fields_passes_or_raises_megaclip_error(tripwire, ds):
    path = tripwire / "ds.json"
    path.write_text(json.dumps(ds), encoding="utf-8")
    precheck(base(), ds=str(path))  # either outcome; anything else raises


@pytest.mark.parametrize(
    "ds",
    [
        {"bf16": 5},
        {"zero_optimization": 3},
        {"bf16": {"enabled": True}, "fp16": {"enabled": True}},
        {"train_batch_size": 7},
        {"zero_optimization": {"stage": "two"}},
    ],
    ids=json.dumps,
)
def test_known_bad_deepspeed_json_raises_megaclip_error(tripwire, ds):
    path = tripwire / "ds.json"
    path.write_text(json.dumps(ds), encoding="utf-8")
    assert precheck(base(), ds=str(path)) == "error"


@SETTINGS
@given(text=st.one_of(st.text(max_size=80), st.sampled_from(["[]", "3", "null", '"x"', "{"])))
def test_deepspeed_json_text_passes_or_raises_megaclip_error(tripwire, text):
    path = tripwire / "ds.json"
    path.write_text(text, encoding="utf-8")
    precheck(base(), ds=str(path))


def test_conflicting_deepspeed_fields_are_reported(tripwire):
    """Each conflict names the fields involved (one targeted example per rule)."""
    path = tripwire / "ds.json"
    cases = [
        ({"train_batch_size": 7}, "train_batch_size=7"),
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 but parallel.zero_stage is 1"),
        ({"bf16": {"enabled": True}}, "trains in bf16 but parallel.precision is fp32"),
        ({"optimizer": {"type": "Adam"}}, "defines 'optimizer'"),
    ]
    for ds, message in cases:
        path.write_text(json.dumps(ds), encoding="utf-8")
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            loop.run_training(run_config_from_dict(base()), str(path))


FLOAT_FIELDS = [
    ("optim", "lr"),
    ("optim", "min_lr"),
    ("optim", "weight_decay"),
    ("optim", "beta1"),
    ("optim", "beta2"),
    ("optim", "eps"),
    ("optim", "grad_clip"),
    ("train", "dist_timeout_s"),
    ("train", "patch_dropout"),
    ("data", "max_skip_fraction"),
    ("model", "init_logit_scale"),
    ("model", "max_logit_scale"),
    ("model", "layer_norm_eps"),
]


@pytest.mark.parametrize("path", FLOAT_FIELDS, ids=".".join)
def test_nan_and_inf_are_rejected_in_every_float_field(tripwire, path):
    for bad in (math.nan, math.inf, -math.inf):
        assert precheck(set_path(base(), path, bad)) == "error", (path, bad)


@pytest.mark.parametrize(
    "path, value",
    [
        (("train", "log_every"), 0),
        (("train", "loss_chunk_size"), 0),
        (("train", "save_every"), -1),
        (("train", "keep_last"), -2),
        (("train", "exit_after"), -1),
        (("train", "dist_timeout_s"), 0),
        (("train", "steps"), 0),
        (("optim", "beta1"), 1.0),
        (("optim", "beta2"), -0.1),
        (("optim", "min_lr"), 1.0),  # above optim.lr
        (("optim", "weight_decay"), -0.1),
        (("data", "max_skip_fraction"), 1.5),
        (("data", "shuffle_buffer"), -1),
        (("data", "workers"), -1),
        (("zeroshot", "every"), -5),
        (("parallel", "grad_accum_steps"), 0),
        (("parallel", "zero_stage"), 4),
        (("model", "vision", "heads"), 0),
        (("model", "text", "width"), -8),
        # what the property tests once found
        (("parallel", "micro_batch_size"), 0),
        (("model", "text", "heads"), -4),
        (("optim", "lr"), float("nan")),
        (("train", "dist_timeout_s"), -1),
        (("train", "out_dir"), "a\x00b"),
        (("data", "max_skip_fraction"), float("inf")),
        (("data",), [1, 2]),
        # found by a CI run: the pre-checks hung (planner searches, per-layer partition loops)
        # or raised OverflowError / OSError instead of one clear error
        (("model", "vision", "layers"), 10**9),
        (("model", "text", "layers"), 10**9),
        (("parallel", "micro_batch_size"), 2**63),
        (("parallel", "grad_accum_steps"), 2**64 + 1),
        (("model", "embed_dim"), 1e308),
        (("model", "text", "vocab_size"), 1e308),
        (("train", "init_from"), "x" * 300),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else repr(v),
)
def test_values_that_would_fail_after_start_up_are_rejected_up_front(tripwire, path, value):
    assert precheck(set_path(base(), path, value)) == "error"


# ------------------------------------------------------------------ defects the properties found
# (non-UTF-8 config files, recursive YAML aliases, over-long preset names and DeepSpeed paths)


def test_non_utf8_config_file_raises_megaclip_error(tripwire):
    path = tripwire / "cfg.yaml"
    path.write_bytes(b"model: tiny\ncomment: caf\xe9\n")
    assert precheck(path=path, overrides=["parallel.dp=1", "data.kind=synthetic"]) == "error"


def test_recursive_yaml_alias_raises_megaclip_error(tripwire):
    path = tripwire / "cfg.yaml"
    path.write_text("model: tiny\nx: &a [*a]\n", encoding="utf-8")
    assert precheck(path=path, overrides=["parallel.dp=1"]) == "error"


def test_overlong_model_name_raises_megaclip_error(tripwire):
    assert precheck(set_path(base(), ("model",), "x" * 300)) == "error"


def test_overlong_deepspeed_path_raises_megaclip_error(tripwire):
    assert precheck(set_path(base(), ("deepspeed",), "x" * 300 + ".json")) == "error"


@pytest.mark.parametrize("value", ["2024-01-01", "!!set {a, b}", "!!binary aGk="])
def test_yaml_values_that_are_not_json_types_raise_megaclip_error(tripwire, value):
    path = tripwire / "cfg.yaml"
    path.write_text(f"model: tiny\ntrain: {{seed: {value}}}\n", encoding="utf-8")
    assert precheck(path=path, overrides=["parallel.dp=1"]) == "error"
