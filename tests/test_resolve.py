"""megaclip.train.resolve: one run, worked out once (issue 20, item 1)."""

from __future__ import annotations

import json

import pytest

from megaclip.config.deepspeed import deepspeed_config
from megaclip.config.train import run_config_from_dict
from megaclip.errors import ConfigError
from megaclip.perf.memory import rank_peaks
from megaclip.train.preflight import Budget
from megaclip.train.resolve import resolve_run


def _cfg(**parallel):
    par = {"dp": 2, "micro_batch_size": 4, "grad_accum_steps": 2, **parallel}
    return run_config_from_dict({"model": "tiny", "parallel": par, "optim": {"grad_clip": 0.5}})


def test_resolved_run_is_the_builders_dict_with_nothing_left_auto():
    run = resolve_run(_cfg(), budget=None)
    assert run.par.schedule in ("keep", "recompute")
    assert dict(run.ds) == deepspeed_config(run.par, gradient_clipping=0.5)
    assert run.world == 2 and run.ds_source is None
    with pytest.raises(TypeError):
        run.ds["train_batch_size"] = 1  # read-only; DeepSpeed gets its own copy
    copy = run.ds_dict()
    copy["zero_optimization"]["stage"] = 3
    assert run.ds["zero_optimization"]["stage"] == 1


def test_json_is_checked_against_the_layout_and_folded_in(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"activation_checkpointing": {}, "train_batch_size": 16}))
    run = resolve_run(_cfg(), path, budget=None)
    assert run.par.activation_checkpointing and run.ds_source == str(path)
    path.write_text(json.dumps({"train_batch_size": 12}))
    with pytest.raises(ConfigError, match="train_batch_size=12 but megaclip's layout gives 16"):
        resolve_run(_cfg(), path, budget=None)
    with pytest.raises(ConfigError, match="optimizer"):
        resolve_run(_cfg(), {"optimizer": {"type": "Adam"}}, budget=None)
    with pytest.raises(ConfigError, match="launched 4 processes"):
        resolve_run(_cfg(), world=4, budget=None)


def test_schedule_follows_the_budget():
    """'auto' keeps the graphs where they fit and recomputes where they do not."""
    assert resolve_run(_cfg(), budget=Budget(1e15, True, "test")).par.schedule == "keep"
    assert resolve_run(_cfg(), budget=Budget(1.0, True, "test")).par.schedule == "recompute"
    assert resolve_run(_cfg(schedule="keep"), budget=Budget(1.0, True, "t")).par.schedule == "keep"


def test_memory_model_uses_the_runs_loss_chunk():
    """The loss's logits block is [rows, train.loss_chunk_size], not an assumed chunk."""
    cfg = _cfg(micro_batch_size=512, grad_accum_steps=4)  # global batch 4096
    par = cfg.parallel

    def peak(chunk):
        return rank_peaks(cfg.model, par, host=False, schedule="keep", loss_chunk=chunk)[0].peak

    rows = par.micro_batch_size * par.grad_accum_steps
    assert peak(1024) - peak(512) == pytest.approx(2 * rows * 512 * 4)
    assert peak(None) == pytest.approx(peak(4096))  # no chunk: the whole batch of 4096


def test_clip_engine_sets_every_member_of_the_checkpoint_protocol():
    """checkpoint/ depends on EngineState, not on the engine: ClipEngine must provide it."""
    import ast
    import inspect
    import textwrap

    from megaclip.checkpoint.engine_state import EngineState
    from megaclip.train.engine import ClipEngine

    tree = ast.parse(textwrap.dedent(inspect.getsource(ClipEngine.__init__)))
    assigned = {
        t.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        for t in (target.elts if isinstance(target, ast.Tuple) else [target])
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    wanted = set(EngineState.__annotations__)
    assert wanted == {"cfg", "par", "topo", "engine", "step_count"}
    assert wanted <= assigned, wanted - assigned
