"""The one fence around DeepSpeed's internals: every private DeepSpeed touch of megaclip is here.

megaclip relies on a few things DeepSpeed does not promise to keep: the pipeline engine's
instruction map, its backward and schedule methods, ZeRO's fragment addresses (``_hp_mapping``)
and partition attributes, the checkpoint engine's ``load``, the overflow scan, the comm
backend's captured functions, ``eval_batch`` calling ``module.eval()``, the optimizer step
call. Each is an :data:`INTERNALS` entry with a check of its shape (the attribute is there, is
callable, has the parameter names megaclip passes, the source still does what megaclip relies
on), and is used only through the small named functions below. Each function runs the checks
of the internals it touches at its first use (cheap, once per process); a mismatch raises one
:class:`DeepSpeedCompatError` line naming the internal, the installed DeepSpeed version and
the range megaclip supports, instead of a wrong result or an AttributeError deep in a step.

Adding an internal: an entry in :data:`INTERNALS` (a function returning what is wrong, or
None), the attribute names it touches in :data:`PRIVATE_NAMES` (tests/test_deepspeed_ast.py then
forbids them elsewhere in megaclip/), a named function here that calls :func:`require` and does
the touch, and a test in tests/test_deepspeed_compat.py that fakes the internal away.

Everything DeepSpeed imports is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch

from megaclip.errors import MegaclipError

#: The DeepSpeed versions megaclip supports (setup.py's pin; a test keeps the two equal).
SUPPORTED = ">=0.16,<0.20"

#: Attribute names of DeepSpeed objects that only this module reads or writes (the AST test).
PRIVATE_NAMES = frozenset(
    {
        "_INSTRUCTION_MAP",
        "_exec_backward_pass",
        "_train_schedule",
        "_exec_schedule",
        "_take_model_step",
        "_hp_mapping",
        "lp_fragment_address",
        "hp_fragment_address",
        "hp_fragment",
        "param_group_index",
        "fp32_partitioned_groups_flat",
        "fp16_groups",
        "fp32_groups",
        "ds_tensor",
        "ds_id",
        "ds_process_group",
        "checkpoint_engine",
        "overflow_checker",
        "has_overflow_serial",
        "cdb",
        "all_gather_function",
        "reduce_scatter_function",
    }
)

#: DeepSpeed engine counters a checkpoint carries (set back by :func:`set_engine_counters`).
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class DeepSpeedCompatError(MegaclipError):
    """The installed DeepSpeed lacks (or changed) an internal megaclip relies on."""


def installed_version() -> str:
    import deepspeed

    return str(getattr(deepspeed, "__version__", "unknown"))


# ------------------------------------------------------------------ shape checks


def _params(fn: Any) -> list[str] | None:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _method(owner: Any, name: str, params: list[str] | None = None) -> str | None:
    """What is wrong with ``owner.name`` as a method taking ``params`` (None: fine)."""
    fn = getattr(owner, name, None)
    if fn is None:
        return "is missing"
    if not callable(fn):
        return f"is not callable (a {type(fn).__name__})"
    if params is not None:
        got = _params(fn)
        if got is not None and got[: len(params)] != params:
            return f"takes ({', '.join(got)}), megaclip calls it with ({', '.join(params)})"
    return None


def _mentions(obj: Any, what: str, texts: tuple[str, ...]) -> str | None:
    src = _source(obj)
    for text in texts:
        if text not in src:
            return f"no longer {what} ('{text}' not found in its source)"
    return None


def _first(*problems: Callable[[], str | None]) -> str | None:
    for problem in problems:
        found = problem()
        if found:
            return found
    return None


def _pipe_engine():
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return PipelineEngine


def _check_instruction_map() -> str | None:
    from deepspeed.runtime.pipe import schedule

    cls = _pipe_engine()
    table = getattr(cls, "_INSTRUCTION_MAP", None)
    if not isinstance(table, dict):
        return "is missing" if table is None else f"is a {type(table).__name__}, not a dict"
    for instr in (schedule.ForwardPass, schedule.BackwardPass, schedule.OptimizerStep):
        if not callable(table.get(instr)):
            return f"has no method for {instr.__name__}"
    return _mentions(
        cls._exec_schedule, "dispatches through it (_exec_schedule)", ("_INSTRUCTION_MAP",)
    )


def _check_backward_pass() -> str | None:
    cls = _pipe_engine()
    return _first(
        lambda: _method(cls, "_exec_backward_pass", ["self", "buffer_id"]),
        lambda: _mentions(
            cls._exec_backward_pass, "backpropagates self.loss on the last stage", ("self.loss",)
        ),
    )


def _check_train_schedule() -> str | None:
    cls = _pipe_engine()
    return _first(
        lambda: _method(cls, "_train_schedule", ["self"]),
        lambda: _mentions(cls.train_batch, "called by train_batch", ("self._train_schedule()",)),
    )


def _check_class_swap() -> str | None:
    cls = _pipe_engine()
    if not isinstance(cls, type):
        return "is not a class"
    if "__slots__" in vars(cls):
        return "defines __slots__ (an instance's class cannot be swapped for a subclass)"
    return None


def _check_eval_batch() -> str | None:
    cls = _pipe_engine()
    fn = getattr(cls, "eval_batch", None)
    if fn is None:
        return "is missing"
    got = _params(fn) or []
    for name in ("data_iter", "reduce_output", "bcast_loss", "num_micro_batches"):
        if name not in got:
            return f"has no parameter '{name}' (it takes {', '.join(got)})"
    return _mentions(fn, "switches the module to eval mode itself", ("self.module.eval()",))


def _check_hp_mapping() -> str | None:
    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")
    mixed_precision_linkage = importlib.import_module("deepspeed.utils.mixed_precision_linkage")
    frag = getattr(tensor_fragment, "tensor_fragment", None)
    addr = getattr(tensor_fragment, "fragment_address", None)
    if frag is None or addr is None or not is_dataclass(frag) or not is_dataclass(addr):
        return "tensor_fragment / fragment_address dataclasses are missing"
    have = {f.name for f in fields(frag)}
    for name in ("lp_fragment_address", "hp_fragment", "hp_fragment_address", "param_group_index"):
        if name not in have:
            return f"tensor_fragment has no field '{name}'"
    if not {"start", "numel"} <= {f.name for f in fields(addr)}:
        return "fragment_address has no start / numel"
    return _mentions(
        getattr(mixed_precision_linkage, "link_hp_params", None),
        "set by link_hp_params",
        ("lp_param._hp_mapping",),
    )


def _check_zero3_flat_groups() -> str | None:
    from deepspeed.runtime.zero import stage3

    return _mentions(
        stage3.DeepSpeedZeroOptimizer_Stage3.__init__,
        "kept by the ZeRO-3 optimizer",
        ("self.fp32_partitioned_groups_flat",),
    )


def _check_zero3_params() -> str | None:
    from deepspeed.runtime.zero.partition_parameters import Init

    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")

    return _first(
        lambda: _method(Init, "_convert_to_deepspeed_param", ["self", "param"]),
        lambda: _mentions(
            Init._convert_to_deepspeed_param,
            "set on each ZeRO-3 parameter",
            tuple(f"param.{a} =" for a in ("ds_tensor", "ds_numel", "ds_shape", "ds_id")),
        ),
        lambda: _mentions(Init._convert_to_deepspeed_param, "set", ("param.ds_process_group",)),
        lambda: _method(tensor_fragment, "safe_set_local_fp32_param", ["param", "value"]),
        lambda: _method(
            tensor_fragment,
            "safe_set_local_optimizer_state",
            ["param", "value", "optim_state_key"],
        ),
    )


def _check_checkpoint_load() -> str | None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    return _first(
        lambda: _method(TorchCheckpointEngine, "load", ["self", "path", "map_location"]),
        lambda: _mentions(
            DeepSpeedEngine._load_checkpoint,
            "used to read checkpoints (_load_checkpoint)",
            ("self.checkpoint_engine.load(",),
        ),
    )


def _check_overflow_serial() -> str | None:
    from deepspeed.runtime.utils import CheckOverflow

    return _first(
        lambda: _method(CheckOverflow, "has_overflow_serial", ["self", "params"]),
        lambda: _mentions(
            CheckOverflow.has_overflow, "called by has_overflow", ("self.has_overflow_serial(",)
        ),
    )


def _check_unfused_groups() -> str | None:
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return _mentions(
        FP16_UnfusedOptimizer.__init__,
        "kept by FP16_UnfusedOptimizer",
        ("self.fp16_groups", "self.fp32_groups"),
    )


def _check_base_optimizer() -> str | None:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer):
        found = _mentions(
            cls.__init__, f"kept by {cls.__name__}", ("self.optimizer = init_optimizer",)
        )
        if found:
            return found
    return None


def _check_comm_backend() -> str | None:
    import deepspeed.comm.comm as ds_comm
    from deepspeed.comm.torch import TorchBackend

    if not hasattr(ds_comm, "cdb"):
        return "deepspeed.comm.comm has no 'cdb'"
    return _mentions(
        TorchBackend.__init__,
        "captured by TorchBackend",
        ("self.all_gather_function", "self.reduce_scatter_function"),
    )


def _check_engine_counters() -> str | None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    return _mentions(
        DeepSpeedEngine.__init__,
        "kept by DeepSpeedEngine",
        tuple(f"self.{c}" for c in ENGINE_COUNTERS),
    )


def _check_optimizer_step() -> str | None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    return _first(
        lambda: _method(DeepSpeedEngine, "_take_model_step", ["self"]),
        lambda: _mentions(
            DeepSpeedEngine._take_model_step,
            "calls the optimizer through its step attribute",
            ("self.optimizer.step()",),
        ),
    )


@dataclass(frozen=True)
class Internal:
    """One DeepSpeed internal megaclip relies on: its name and the check of its shape."""

    name: str
    check: Callable[[], str | None]  # what is wrong with it, or None


#: key -> internal; :func:`require` runs a key's check once per process.
INTERNALS: dict[str, Internal] = {
    "instruction_map": Internal("PipelineEngine._INSTRUCTION_MAP", _check_instruction_map),
    "backward_pass": Internal("PipelineEngine._exec_backward_pass", _check_backward_pass),
    "train_schedule": Internal("PipelineEngine._train_schedule", _check_train_schedule),
    "class_swap": Internal("PipelineEngine (instance __class__ swap)", _check_class_swap),
    "eval_batch": Internal("PipelineEngine.eval_batch (module.eval())", _check_eval_batch),
    "hp_mapping": Internal("param._hp_mapping (tensor_fragment)", _check_hp_mapping),
    "zero3_flat_groups": Internal(
        "DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat", _check_zero3_flat_groups
    ),
    "zero3_params": Internal(
        "ZeRO-3 parameter attributes (ds_tensor, ds_numel, ds_shape, ds_id, ds_process_group)",
        _check_zero3_params,
    ),
    "checkpoint_load": Internal("DeepSpeedEngine.checkpoint_engine.load", _check_checkpoint_load),
    "overflow_serial": Internal("CheckOverflow.has_overflow_serial", _check_overflow_serial),
    "unfused_groups": Internal(
        "FP16_UnfusedOptimizer.fp16_groups / fp32_groups", _check_unfused_groups
    ),
    "base_optimizer": Internal("optimizer wrapper .optimizer", _check_base_optimizer),
    "comm_backend": Internal(
        "deepspeed.comm.comm.cdb (all_gather_function, reduce_scatter_function)",
        _check_comm_backend,
    ),
    "engine_counters": Internal(
        "DeepSpeedEngine counters (" + ", ".join(ENGINE_COUNTERS) + ")", _check_engine_counters
    ),
    "optimizer_step": Internal(
        "DeepSpeedEngine._take_model_step (optimizer.step())", _check_optimizer_step
    ),
}

_checked: set[str] = set()


def _error(name: str, problem: str) -> DeepSpeedCompatError:
    return DeepSpeedCompatError(
        f"DeepSpeed {installed_version()}: {name} {problem}; megaclip relies on it and supports "
        f"deepspeed{SUPPORTED} (pip install 'deepspeed{SUPPORTED}')"
    )


def require(*keys: str) -> None:
    """Check the internals ``keys`` (once per process); DeepSpeedCompatError on a mismatch."""
    for key in keys:
        if key in _checked:
            continue
        internal = INTERNALS[key]
        try:
            problem = internal.check()
        except (ImportError, AttributeError) as err:
            problem = f"cannot be found ({type(err).__name__}: {err})"
        if problem:
            raise _error(internal.name, problem)
        _checked.add(key)


def check_all() -> None:
    """Check every internal in :data:`INTERNALS`."""
    require(*INTERNALS)


# ------------------------------------------------------------------ pipeline engine

PipeInstructionFn = Callable[..., None]  # (engine, **instruction kwargs)


def pipeline_engine_class(
    name: str,
    *,
    schedule: Callable[[Any], Any],
    instructions: Mapping[type, PipeInstructionFn],
    backward_loss: Callable[[Any, int], torch.Tensor | None],
    doc: str = "",
    module: str = __name__,
) -> type:
    """A PipelineEngine subclass with its own training schedule and instructions.

    ``schedule(engine)``: the PipeSchedule of ``train_batch``. ``instructions``: extra
    PipeInstruction types -> ``fn(engine, **kwargs)``. ``backward_loss(engine, buffer_id)``:
    the scalar the last stage backpropagates for that buffer (None: DeepSpeed's own loss).
    """
    require("instruction_map", "backward_pass", "train_schedule")
    from deepspeed.runtime.pipe import schedule as ds_schedule

    base = _pipe_engine()

    def _train_schedule(self):
        return schedule(self)

    def _exec_backward_pass(self, buffer_id: int) -> None:
        loss = backward_loss(self, buffer_id)
        if loss is not None:
            self.loss = loss
        base._exec_backward_pass(self, buffer_id)

    # The engine dispatches through this class-level map, not through method overrides.
    table = {**base._INSTRUCTION_MAP, ds_schedule.BackwardPass: _exec_backward_pass}
    table.update(instructions)
    namespace = {
        "__doc__": doc,
        "__module__": module,
        "__qualname__": name,
        "_train_schedule": _train_schedule,
        "_exec_backward_pass": _exec_backward_pass,
        "_INSTRUCTION_MAP": table,
    }
    return type(name, (base,), namespace)


def swap_engine_class(engine: Any, cls: type) -> Any:
    """Make an initialised PipelineEngine an instance of its subclass ``cls`` (no new state)."""
    require("class_swap")
    if not isinstance(engine, _pipe_engine()) or not issubclass(cls, type(engine)):
        raise TypeError(f"cannot make a {type(engine).__name__} a {cls.__name__}")
    engine.__class__ = cls
    return engine


@contextlib.contextmanager
def training_mode_kept(module: torch.nn.Module) -> Iterator[None]:
    """Inside, ``module.eval()`` / ``train(False)`` leave the module in training mode.

    For ``PipelineEngine.eval_batch``, which switches the module to eval mode itself (patch
    dropout would stop): an instance attribute shadows the method meanwhile.
    """
    require("eval_batch")
    original = module.train
    module.train = lambda mode=True: original(True)
    try:
        yield
    finally:
        del module.train


# ------------------------------------------------------------------ ZeRO partitions


@dataclass(frozen=True)
class Fp32Fragment:
    """Where this rank's fp32 master piece of a 16-bit / ZeRO-1/2 parameter lives."""

    master: torch.Tensor  # the fp32 fragment (a view into the flat partition)
    lp_start: int  # its first element in the flattened module parameter
    lp_numel: int
    hp_start: int  # its first element in the optimizer's flat partition of the group
    hp_numel: int
    group: int  # index of the optimizer param group whose flat partition holds it


def has_hp_mapping(param: torch.Tensor) -> bool:
    """Whether DeepSpeed linked ``param`` to fp32 fragments (the attribute exists, maybe None)."""
    require("hp_mapping")
    return hasattr(param, "_hp_mapping")


def fp32_fragment(param: torch.Tensor) -> Fp32Fragment | None:
    """This rank's fp32 fragment of ``param`` (ZeRO-1/2, bf16 optimizer), else None."""
    require("hp_mapping")
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    return Fp32Fragment(
        mapping.hp_fragment, lp.start, lp.numel, hp.start, hp.numel, mapping.param_group_index
    )


def zero3_flat_groups(ds_optimizer: Any) -> list[torch.Tensor] | None:
    """The ZeRO-3 optimizer's fp32 flat partitions Adam steps on (None: not ZeRO-3)."""
    require("zero3_flat_groups")
    return getattr(ds_optimizer, "fp32_partitioned_groups_flat", None)


def unfused_fp32_masters(ds_optimizer: Any) -> dict[int, torch.Tensor]:
    """{id(module param): its fp32 master} of DeepSpeed's unfused 16-bit optimizer, else {}."""
    require("unfused_groups")
    lp = getattr(ds_optimizer, "fp16_groups", None)
    hp = getattr(ds_optimizer, "fp32_groups", None)
    if not lp or not hp or len(lp) != len(hp):
        return {}
    return {id(p): m for g16, g32 in zip(lp, hp) for p, m in zip(g16, g32)}


def lp_param_groups(ds_optimizer: Any) -> list[list[torch.Tensor]] | None:
    """The 16-bit parameter groups (``fp16_groups``) of a DeepSpeed optimizer wrapper, or None."""
    require("unfused_groups")
    return getattr(ds_optimizer, "fp16_groups", None)


def base_optimizer(ds_optimizer: Any) -> Any:
    """The torch optimizer inside DeepSpeed's wrapper (the object itself when unwrapped)."""
    require("base_optimizer")
    return getattr(ds_optimizer, "optimizer", ds_optimizer)


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by ZeRO-3 (``deepspeed.zero.Init``)."""
    require("zero3_params")
    return hasattr(param, "ds_id")


@dataclass(frozen=True)
class Zero3Partition:
    """This DP rank's ZeRO-3 partition of one parameter."""

    data: torch.Tensor  # the partition's storage, flat (padding included)
    start: int  # its first element in the flattened full parameter
    valid: int  # elements of the parameter in it; the rest is padding


def zero3_partition(param: torch.Tensor) -> Zero3Partition:
    """This rank's partition of a ZeRO-3 parameter (writing ``data`` writes the weight)."""
    require("zero3_params")
    import torch.distributed as dist

    part = param.ds_tensor.ds_numel
    rank = dist.get_rank(group=param.ds_process_group)
    start = rank * part
    valid = max(0, min(part, param.ds_numel - start))
    return Zero3Partition(param.ds_tensor.data.view(-1), start, valid)


def zero3_partition_numel(param: torch.Tensor) -> int:
    """Elements (padding included) of this rank's partition of a ZeRO-3 parameter."""
    require("zero3_params")
    return param.ds_tensor.numel()


def zero3_partition_tensor(param: torch.Tensor) -> torch.Tensor | None:
    """The partition storage of a ZeRO-3 parameter (None for other parameters); read only."""
    require("zero3_params")
    return getattr(param, "ds_tensor", None)


def write_zero3_param(param: torch.Tensor, piece: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's ``piece`` of a ZeRO-3 weight (and ``full``, if it is gathered now)."""
    require("zero3_params")
    ds = param.ds_tensor
    ds.data.copy_(piece.to(ds.device, ds.dtype))
    if param.data.numel() == param.ds_numel:  # currently gathered (persistent)
        param.data.copy_(full.to(param.device, param.dtype).view_as(param.data))


def set_zero3_master(param: torch.Tensor, piece: torch.Tensor) -> None:
    """Write this rank's fp32 master partition of a ZeRO-3 parameter."""
    require("zero3_params")
    from deepspeed.utils import safe_set_local_fp32_param

    safe_set_local_fp32_param(param, piece)


def set_zero3_moment(param: torch.Tensor, piece: torch.Tensor, key: str) -> None:
    """Write this rank's partition of optimizer state ``key`` of a ZeRO-3 parameter."""
    require("zero3_params")
    from deepspeed.utils import safe_set_local_optimizer_state

    safe_set_local_optimizer_state(param, piece, key)


# ------------------------------------------------------------------ engine and optimizer


def set_engine_counters(engine: Any, counters: Mapping[str, Any]) -> None:
    """Set DeepSpeed's step counters (``ENGINE_COUNTERS``) of ``engine`` from ``counters``.

    None values, and keys that are not one of the counters, leave the engine as it is.
    """
    require("engine_counters")
    for key in ENGINE_COUNTERS:
        value = counters.get(key)
        if value is not None:
            setattr(engine, key, value)


@contextlib.contextmanager
def checkpoint_loads_through(engine: Any, load: Callable[..., Any]) -> Iterator[None]:
    """Inside, DeepSpeed's checkpoint reads of ``engine`` call ``load(path, map_location)``."""
    require("checkpoint_load")
    ce = engine.checkpoint_engine
    ce.load = load  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del ce.load


def replace_overflow_scan(ds_optimizer: Any, scan: Callable[[Any], bool]) -> bool:
    """Make the fp16/bf16 ZeRO-0 wrapper's per-tensor overflow scan ``scan(params)``.

    Whether it applied (ZeRO optimizers have no such scan and are left alone).
    """
    require("overflow_serial")
    checker = getattr(ds_optimizer, "overflow_checker", None)
    if checker is None or not hasattr(checker, "has_overflow_serial"):
        return False
    checker.has_overflow_serial = scan
    return True


def wrap_optimizer_step(ds_optimizer: Any, around: Callable[[], contextlib.AbstractContextManager]):
    """Run each step of the engine's optimizer inside ``around()`` (measurement hooks)."""
    require("optimizer_step")
    step = ds_optimizer.step

    @functools.wraps(step)
    def wrapped(*args, **kwargs):
        with around():
            return step(*args, **kwargs)

    ds_optimizer.step = wrapped


def comm_backend_functions() -> list[tuple[Any, str, str]]:
    """(owner, attribute, torch collective) of the functions DeepSpeed's comm backend captured.

    Its all-gather and reduce-scatter are looked up once when the backend is created, so a shim
    around torch.distributed misses them unless it replaces these too. [] before it exists.
    """
    require("comm_backend")
    import deepspeed.comm.comm as ds_comm

    cdb = getattr(ds_comm, "cdb", None)
    if cdb is None:
        return []
    pairs = (
        ("all_gather_function", "all_gather_into_tensor"),
        ("reduce_scatter_function", "reduce_scatter_tensor"),
    )
    return [(cdb, attr, name) for attr, name in pairs if getattr(cdb, attr, None) is not None]
