"""A counting shim around torch.distributed collectives: bytes, calls and time per op and group.

:class:`CommCounter` replaces the collective functions of ``torch.distributed`` (and of
``distributed_c10d``, where torch's own helpers look them up) by wrappers that record one
:class:`CommRecord` per outermost call while recording is on, then call the original. Every
layer that talks to process groups goes through these names at call time: megatron-core's TP
mappings, megaclip's collectives, DeepSpeed's ``deepspeed.comm`` (whose all-gather and
reduce-scatter functions are captured when DeepSpeed's backend is created, so install the
counter *before* ``init_distributed()``; :meth:`CommCounter.install` also re-wraps an existing
backend's captured functions).

Per record: the payload (the logical tensor: the full tensor of an all-reduce or broadcast, the
gathered output of an all-gather, the input of a reduce-scatter, the tensor of a send/recv) and
the bytes this rank *sends* with a ring algorithm over n ranks
(:func:`megaclip.perf.comm.sent_bytes`; recv and barrier send 0).

The time is the wall time spent inside the call (for ``async_op=True`` only the issue time).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from megaclip.parallel.deepspeed_compat import comm_backend_functions
from megaclip.perf.comm import sent_bytes

#: Collectives wrapped by the shim: name -> kind ("ring-ar", "ring-ag", "ring-rs", "bcast",
#: "send", "recv", "batch", "barrier").
WRAPPED: dict[str, str] = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "all_to_all": "all_to_all",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "gather": "gather",
    "scatter": "scatter",
    "send": "send",
    "isend": "send",
    "recv": "recv",
    "irecv": "recv",
    "batch_isend_irecv": "batch",
    "barrier": "barrier",
}


@dataclass(frozen=True)
class CommRecord:
    """One collective call of this rank: op kind, group members, payload, bytes sent, time."""

    op: str  # kind from WRAPPED ("all_reduce", "all_gather", "send", ...)
    name: str  # the torch function called
    ranks: tuple[int, ...]  # global ranks of the group (p2p: sorted (self, peer))
    dtype: str
    payload_bytes: int
    sent_bytes: float
    seconds: float
    phase: str  # label active when the call was made (see CommCounter.phase)
    shape: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        """Number of ranks taking part (2 for send/recv)."""
        return len(self.ranks)


def _nbytes(t: object) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, list | tuple):
        return sum(_nbytes(x) for x in t)
    return 0


def _first_tensor(t: object) -> torch.Tensor | None:
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(t, list | tuple):
        for x in t:
            found = _first_tensor(x)
            if found is not None:
                return found
    return None


def _group_ranks(group: object) -> tuple[int, ...]:
    if group is None:
        group = c10d.GroupMember.WORLD
    try:
        return tuple(dist.get_process_group_ranks(group))
    except Exception:  # a group this rank is not part of, or a backend object
        return ()


#: Collectives whose payload is not their ``tensor`` argument: name -> (the argument holding the
#: payload, the argument holding a representative tensor, or a list whose first tensor is one).
_PAYLOAD_ARGS: dict[str, tuple[str, str]] = {
    "all_gather_into_tensor": ("output_tensor", "input_tensor"),
    "_all_gather_base": ("output_tensor", "input_tensor"),
    "all_gather": ("tensor_list", "tensor"),
    "all_gather_coalesced": ("output_tensor_lists", "input_tensor_list"),
    "reduce_scatter_tensor": ("input", "input"),
    "_reduce_scatter_base": ("input", "input"),
    "reduce_scatter": ("input_list", "output"),
    "all_reduce_coalesced": ("tensors", "tensors"),
    "all_to_all_single": ("input", "input"),
    "all_to_all": ("input_tensor_list", "input_tensor_list"),
}


def _payload(name: str, a: dict) -> tuple[int, torch.Tensor | None]:
    """(payload bytes, a representative tensor) of a bound call of collective ``name``."""
    if name == "barrier":
        return 0, None
    if name in _PAYLOAD_ARGS:
        payload, representative = _PAYLOAD_ARGS[name]
        return _nbytes(a[payload]), _first_tensor(a[representative])
    tensor = a.get("tensor")
    return _nbytes(tensor), tensor


def _peer(name: str, a: dict) -> int | None:
    key = "dst" if name in ("send", "isend") else "src"
    peer = a.get(key)
    group_key = "group_dst" if key == "dst" else "group_src"
    if peer is None and a.get(group_key) is not None:
        peer = dist.get_global_rank(a.get("group") or c10d.GroupMember.WORLD, a[group_key])
    return peer


class CommCounter:
    """Records every collective this process makes while :meth:`recording` is active.

    Usage::

        counter = CommCounter()
        counter.install()          # before init_distributed()
        ...
        with counter.recording():  # only calls made in here are recorded
            engine.train_step(batches)
        counter.records            # list[CommRecord]

    ``phase(label)`` tags the records made inside it (e.g. "loss"); nested labels override.
    """

    def __init__(self) -> None:
        self.records: list[CommRecord] = []
        self._originals: dict[tuple[object, str], Callable] = {}
        self._local = threading.local()
        self._active = False
        self._phase = "step"

    # ------------------------------------------------------------ install / uninstall

    def install(self) -> CommCounter:
        """Wrap the collectives in torch.distributed, distributed_c10d and DeepSpeed's backend."""
        for module in (dist, c10d):
            for name in WRAPPED:
                fn = getattr(module, name, None)
                if fn is None or (module, name) in self._originals:
                    continue
                self._originals[(module, name)] = fn
                setattr(module, name, self._wrap(name, fn))
        self._wrap_deepspeed_backend()
        return self

    def _wrap_deepspeed_backend(self) -> None:
        for owner, attr, name in comm_backend_functions():
            fn = getattr(owner, attr)
            if not getattr(fn, "_megaclip_counted", False):
                self._originals[(owner, attr)] = fn
                setattr(owner, attr, self._wrap(name, fn))

    def uninstall(self) -> None:
        """Restore every wrapped function."""
        for (owner, name), fn in self._originals.items():
            setattr(owner, name, fn)
        self._originals.clear()

    # ------------------------------------------------------------ recording

    @contextmanager
    def recording(self) -> Iterator[CommCounter]:
        """Record the collectives called inside the block."""
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    @contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """Tag records made inside the block with ``label``."""
        previous, self._phase = self._phase, label
        try:
            yield
        finally:
            self._phase = previous

    def reset(self) -> None:
        """Forget all records."""
        self.records = []

    def _wrap(self, name: str, fn: Callable) -> Callable:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            sig = None
        counter = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            local = counter._local
            depth = getattr(local, "depth", 0)
            if depth > 0 or not counter._active or sig is None:
                local.depth = depth + 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    local.depth = depth
            local.depth = 1
            try:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                seconds = time.perf_counter() - t0
            finally:
                local.depth = 0
            try:
                counter._record(name, sig, args, kwargs, seconds)
            except Exception as err:  # never break training because of bookkeeping
                counter.records.append(
                    CommRecord("error", name, (), "", 0, 0.0, seconds, repr(err))
                )
            return out

        wrapper._megaclip_counted = True  # type: ignore[attr-defined]
        return wrapper

    def _record(self, name: str, sig: inspect.Signature, args, kwargs, seconds: float) -> None:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        kind = WRAPPED[name]
        if kind == "batch":
            for op in a["p2p_op_list"]:
                send = "isend" in getattr(op.op, "__name__", "")
                peer = op.peer
                me = dist.get_rank()
                nbytes = _nbytes(op.tensor)
                self.records.append(
                    CommRecord(
                        "send" if send else "recv",
                        "batch_isend_irecv",
                        tuple(sorted((me, peer))),
                        str(op.tensor.dtype).replace("torch.", ""),
                        nbytes,
                        float(nbytes) if send else 0.0,
                        seconds / max(1, len(a["p2p_op_list"])),
                        self._phase,
                        tuple(op.tensor.shape),
                    )
                )
            return
        payload, tensor = _payload(name, a)
        if kind in ("send", "recv"):
            peer = _peer(name, a)
            me = dist.get_rank()
            ranks = tuple(sorted((me, peer))) if peer is not None else (me,)
            n = 2
        else:
            ranks = _group_ranks(a.get("group"))
            n = len(ranks)
        dtype = str(tensor.dtype).replace("torch.", "") if tensor is not None else ""
        shape = tuple(tensor.shape) if tensor is not None else ()
        self.records.append(
            CommRecord(
                kind,
                name,
                ranks,
                dtype,
                payload,
                sent_bytes(kind, payload, n),
                seconds,
                self._phase,
                shape,
            )
        )


# ---------------------------------------------------------------- classification (pure)


def classify(record: CommRecord, groups: dict[str, Sequence[int]]) -> str:
    """Which traffic class a record belongs to: "loss", "tp", "dp", "pp", "self" or "other:<n>".

    ``groups`` maps axis names ("tp", "dp", "pp") to this rank's group members. Records made in
    the "loss" phase are loss traffic; a p2p pair inside the PP group is PP; otherwise the
    group whose membership equals the record's (the non-trivial one when several are equal).
    """
    if len(record.ranks) <= 1:
        return "self"
    if record.phase == "loss":
        return "loss"
    members = set(record.ranks)
    if record.op in ("send", "recv"):
        for axis in ("pp", "tp", "dp"):
            if members <= set(groups.get(axis, ())) and len(groups.get(axis, ())) > 1:
                return axis
        return f"other:{len(members)}"
    for axis in ("tp", "dp", "pp"):
        g = groups.get(axis, ())
        if len(g) > 1 and set(g) == members:
            return axis
    return f"other:{len(members)}"


@dataclass(frozen=True)
class ClassTotal:
    """Per-step totals of one (class, op) pair: calls, payload bytes, sent bytes, seconds."""

    cls: str
    op: str
    calls: float
    payload_bytes: float
    sent_bytes: float
    seconds: float


def totals(
    records: Sequence[CommRecord], groups: dict[str, Sequence[int]], steps: int = 1
) -> list[ClassTotal]:
    """Sum records by (class, op) and divide by ``steps``: per-step figures of this rank."""
    acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for r in records:
        key = (classify(r, groups), r.op)
        row = acc[key]
        row[0] += 1
        row[1] += r.payload_bytes
        row[2] += r.sent_bytes
        row[3] += r.seconds
    return [
        ClassTotal(cls, op, v[0] / steps, v[1] / steps, v[2] / steps, v[3] / steps)
        for (cls, op), v in sorted(acc.items())
    ]


def seconds_by_class(
    records: Sequence[CommRecord], groups: dict[str, Sequence[int]], ops: Sequence[str] = ()
) -> dict[str, float]:
    """Wall seconds spent inside collectives per class (optionally only the given op kinds)."""
    out: dict[str, float] = defaultdict(float)
    for r in records:
        if ops and r.op not in ops:
            continue
        out[classify(r, groups)] += r.seconds
    return dict(out)
