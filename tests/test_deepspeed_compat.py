"""The DeepSpeed fence (megaclip/parallel/deepspeed_compat.py): each internal megaclip relies on
is checked on the installed DeepSpeed, and a faked missing / changed internal gives one clear
line naming the internal, the installed version and the supported range."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import torch

from megaclip.errors import MegaclipError
from megaclip.parallel import deepspeed_compat as compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Each test sees the checks unrun (they are memoised per process)."""
    monkeypatch.setattr(compat, "_checked", set())


def _pipe_engine():
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return PipelineEngine


def _break_instruction_map(mp):
    mp.delattr(_pipe_engine(), "_INSTRUCTION_MAP")


def _break_backward_pass(mp):
    mp.setattr(_pipe_engine(), "_exec_backward_pass", lambda self, micro_batch, buffer_id: None)


def _break_train_schedule(mp):
    mp.delattr(_pipe_engine(), "_train_schedule")


def _break_class_swap(mp):
    mp.setattr(_pipe_engine(), "__slots__", ("x",), raising=False)


def _break_eval_batch(mp):
    mp.setattr(_pipe_engine(), "eval_batch", lambda self, data_iter, return_logits=False: None)


def _break_hp_mapping(mp):
    module = importlib.import_module("deepspeed.utils.tensor_fragment")

    @dataclasses.dataclass
    class tensor_fragment:  # noqa: N801 - DeepSpeed's spelling
        lp_fragment: torch.Tensor
        hp_fragment: torch.Tensor

    mp.setattr(module, "tensor_fragment", tensor_fragment)


def _break_zero3_flat_groups(mp):
    from deepspeed.runtime.zero import stage3

    class DeepSpeedZeroOptimizer_Stage3:  # noqa: N801 - DeepSpeed's spelling
        def __init__(self, init_optimizer):
            self.fp32_flat_partitions = []

    mp.setattr(stage3, "DeepSpeedZeroOptimizer_Stage3", DeepSpeedZeroOptimizer_Stage3)


def _break_zero3_params(mp):
    from deepspeed.runtime.zero.partition_parameters import Init

    def _convert_to_deepspeed_param(self, param):
        param.ds_local = None

    mp.setattr(Init, "_convert_to_deepspeed_param", _convert_to_deepspeed_param)


def _break_checkpoint_load(mp):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    mp.setattr(TorchCheckpointEngine, "load", lambda self, path: None)


def _break_overflow_serial(mp):
    from deepspeed.runtime.utils import CheckOverflow

    mp.delattr(CheckOverflow, "has_overflow_serial")


def _break_unfused_groups(mp):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    def __init__(self, init_optimizer):
        self.bit16_groups = []

    mp.setattr(FP16_UnfusedOptimizer, "__init__", __init__)


def _break_base_optimizer(mp):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    def __init__(self, init_optimizer):
        self.wrapped = init_optimizer

    mp.setattr(BF16_Optimizer, "__init__", __init__)


def _break_comm_backend(mp):
    import deepspeed.comm.comm as ds_comm

    mp.delattr(ds_comm, "cdb")


def _break_engine_counters(mp):
    from deepspeed.runtime.engine import DeepSpeedEngine

    def __init__(self, args, model):
        self.steps = 0

    mp.setattr(DeepSpeedEngine, "__init__", __init__)


def _break_optimizer_step(mp):
    from deepspeed.runtime.engine import DeepSpeedEngine

    mp.delattr(DeepSpeedEngine, "_take_model_step")


BREAK = {
    "instruction_map": _break_instruction_map,
    "backward_pass": _break_backward_pass,
    "train_schedule": _break_train_schedule,
    "class_swap": _break_class_swap,
    "eval_batch": _break_eval_batch,
    "hp_mapping": _break_hp_mapping,
    "zero3_flat_groups": _break_zero3_flat_groups,
    "zero3_params": _break_zero3_params,
    "checkpoint_load": _break_checkpoint_load,
    "overflow_serial": _break_overflow_serial,
    "unfused_groups": _break_unfused_groups,
    "base_optimizer": _break_base_optimizer,
    "comm_backend": _break_comm_backend,
    "engine_counters": _break_engine_counters,
    "optimizer_step": _break_optimizer_step,
}


def test_every_internal_has_a_test():
    assert set(BREAK) == set(compat.INTERNALS)


@pytest.mark.parametrize("key", sorted(compat.INTERNALS))
def test_installed_deepspeed_passes(key):
    compat.require(key)
    assert key in compat._checked


@pytest.mark.parametrize("key", sorted(compat.INTERNALS))
def test_faked_change_raises_one_clear_line(key, monkeypatch):
    BREAK[key](monkeypatch)
    with pytest.raises(compat.DeepSpeedCompatError) as info:
        compat.require(key)
    msg = str(info.value)
    assert isinstance(info.value, MegaclipError)
    assert "\n" not in msg
    assert compat.INTERNALS[key].name in msg
    assert f"DeepSpeed {compat.installed_version()}" in msg
    assert f"deepspeed{compat.SUPPORTED}" in msg
    assert key not in compat._checked  # a later call checks again


def test_check_runs_once(monkeypatch):
    compat.require("overflow_serial")
    _break_overflow_serial(monkeypatch)
    compat.require("overflow_serial")  # memoised: not re-checked


def test_supported_range_is_setup_pys():
    pin = re.search(r'"deepspeed([^"]+)"', (ROOT / "setup.py").read_text(encoding="utf-8"))
    assert pin and pin.group(1) == compat.SUPPORTED


def test_installed_version_is_in_the_supported_range():
    from packaging.specifiers import SpecifierSet

    assert compat.installed_version() in SpecifierSet(compat.SUPPORTED)


# ------------------------------------------------------------------ the fence's functions
# Each one checks its internals first: a faked-away internal fails the function in one line.


def test_functions_check_their_internals(monkeypatch):
    _break_hp_mapping(monkeypatch)
    with pytest.raises(compat.DeepSpeedCompatError, match="_hp_mapping"):
        compat.fp32_fragment(torch.nn.Parameter(torch.zeros(2)))
    _break_overflow_serial(monkeypatch)
    with pytest.raises(compat.DeepSpeedCompatError, match="has_overflow_serial"):
        compat.replace_overflow_scan(object(), lambda params: False)
    _break_class_swap(monkeypatch)
    with pytest.raises(compat.DeepSpeedCompatError, match="__class__"):
        compat.swap_engine_class(object(), _pipe_engine())


def test_pipeline_engine_class():
    from deepspeed.runtime.pipe import schedule

    from megaclip.pipeline.engine import GlobalLossPipelineEngine
    from megaclip.pipeline.schedule import GlobalLoss

    cls = GlobalLossPipelineEngine
    assert issubclass(cls, _pipe_engine()) and cls.__module__ == "megaclip.pipeline.engine"
    table = cls._INSTRUCTION_MAP
    assert GlobalLoss in table and table[schedule.BackwardPass] is cls._exec_backward_pass
    assert table[schedule.ForwardPass] is _pipe_engine()._INSTRUCTION_MAP[schedule.ForwardPass]
    with pytest.raises(TypeError):
        compat.swap_engine_class(object(), cls)


def test_hp_fragment_reads_the_mapping():
    tf = importlib.import_module("deepspeed.utils.tensor_fragment")
    param = torch.nn.Parameter(torch.zeros(6))
    assert compat.fp32_fragment(param) is None and not compat.has_hp_mapping(param)
    param._hp_mapping = None
    assert compat.fp32_fragment(param) is None and compat.has_hp_mapping(param)
    master = torch.zeros(3)
    param._hp_mapping = tf.tensor_fragment(
        lp_fragment=param[2:5],
        lp_fragment_address=tf.fragment_address(numel=3, start=2),
        hp_fragment=master,
        hp_fragment_address=tf.fragment_address(numel=3, start=7),
        gradient_dict={},
        offload_gradient_dict={},
        use_offload=False,
        param_group_index=1,
    )
    frag = compat.fp32_fragment(param)
    assert frag.master is master and (frag.lp_start, frag.lp_numel) == (2, 3)
    assert (frag.hp_start, frag.hp_numel, frag.group) == (7, 3, 1)


def test_unfused_masters_and_groups():
    a, b = torch.zeros(2), torch.zeros(3)
    ma, mb = a.float(), b.float()
    opt = type("Unfused", (), {"fp16_groups": [[a, b]], "fp32_groups": [[ma, mb]]})()
    assert compat.unfused_fp32_masters(opt) == {id(a): ma, id(b): mb}
    assert compat.lp_param_groups(opt) == [[a, b]]
    assert compat.unfused_fp32_masters(object()) == {} and compat.lp_param_groups(object()) is None
    inner = object()
    assert compat.base_optimizer(type("W", (), {"optimizer": inner})()) is inner
    assert compat.base_optimizer(inner) is inner
    assert compat.zero3_flat_groups(object()) is None


def test_engine_counters_and_checkpoint_loads():
    class Ce:
        def load(self, path, map_location=None):
            return "class"

    engine = type("E", (), {})()
    engine.checkpoint_engine = Ce()
    compat.set_engine_counters(engine, {"global_steps": 5, "skipped_steps": None, "other": 1})
    assert engine.global_steps == 5 and not hasattr(engine, "skipped_steps")
    assert not hasattr(engine, "other")
    with compat.checkpoint_loads_through(engine, lambda path, map_location=None: "mapped"):
        assert engine.checkpoint_engine.load("x") == "mapped"
    assert engine.checkpoint_engine.load("x") == "class"


def test_overflow_scan_and_optimizer_step():
    checker = type("Checker", (), {"has_overflow_serial": lambda self, params: True})()
    opt = type("Wrapper", (), {"overflow_checker": checker})()
    assert compat.replace_overflow_scan(opt, lambda params: False)
    assert opt.overflow_checker.has_overflow_serial([]) is False
    assert not compat.replace_overflow_scan(object(), lambda params: False)

    seen = []

    class Opt:
        def step(self, closure=None):
            seen.append("step")
            return 7

    @contextlib.contextmanager
    def around():
        seen.append("in")
        yield
        seen.append("out")

    o = Opt()
    compat.wrap_optimizer_step(o, around)
    assert o.step() == 7 and seen == ["in", "step", "out"]


def test_training_mode_kept():
    module = torch.nn.Linear(2, 2)
    with compat.training_mode_kept(module):
        module.eval()
        assert module.training
    module.eval()
    assert not module.training


def test_comm_backend_functions():
    import deepspeed.comm.comm as ds_comm

    found = compat.comm_backend_functions()
    if ds_comm.cdb is None:
        assert found == []
    for owner, attr, name in found:
        assert callable(getattr(owner, attr)) and name.endswith("_tensor")
