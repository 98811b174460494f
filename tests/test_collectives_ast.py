"""Every torch.distributed collective in megaclip goes through megaclip/parallel/collectives.py.

The module puts host-side values on the accelerator and back, checks that device tensors sit
where the group's backend wants them, and sends bookkeeping over the gloo host group; a
collective called anywhere else bypasses all that (a CPU tensor on a NCCL group fails only on a
GPU). This walks the package's syntax trees: calls of a collective through ``torch.distributed``
(under any alias, a ``from`` import or the full dotted path), ``distributed_c10d``,
``torch.distributed.nn.functional`` or ``deepspeed.comm`` are allowed in that one file only.
DeepSpeed's and megatron-core's own internals are not megaclip's code and are not covered.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.ast_util import PACKAGE, chain, strays

ALLOWED = {Path("parallel/collectives.py")}

#: Modules whose collectives count (a call of one of COLLECTIVES on them is flagged).
COMM_MODULES = {
    "torch.distributed",
    "torch.distributed.distributed_c10d",
    "torch.distributed.nn",
    "torch.distributed.nn.functional",
    "deepspeed.comm",
    "deepspeed.comm.comm",
}
COLLECTIVES = {
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_coalesced",
    "all_gather_object",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "send_object_list",
    "recv_object_list",
    "batch_isend_irecv",
    "barrier",
    "monitored_barrier",
    "new_group",  # groups are made in collectives (host group) and by megatron via Topology
}


def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' of a Name/Attribute chain, else None."""
    parts = chain(node)
    return None if parts is None else ".".join(parts)


def stray_collectives(source: str) -> list[tuple[int, str]]:
    """(line, dotted call) of every collective call in ``source`` (one module's text)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> full dotted module or function path
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        full = aliases.get(head, head) + (f".{rest}" if rest else "")
        module, _, func = full.rpartition(".")
        if func in COLLECTIVES and module in COMM_MODULES:
            found.append((node.lineno, full))
    return found


def test_every_collective_goes_through_parallel_collectives():
    found = strays(stray_collectives, ALLOWED)
    assert not found, "collectives outside megaclip/parallel/collectives.py:\n" + "\n".join(found)


def test_collectives_module_is_where_they_are():
    """The allowed file really holds the collectives (so the scan matches real code)."""
    calls = stray_collectives((PACKAGE / "parallel/collectives.py").read_text(encoding="utf-8"))
    names = {c.rsplit(".", 1)[1] for _, c in calls}
    assert {"all_reduce", "broadcast", "all_gather", "barrier", "all_gather_object"} <= names


@pytest.mark.parametrize(
    "source",
    [
        "import torch.distributed as dist\ndist.all_reduce(t)",
        "import torch.distributed as d\nd.barrier()",
        "import torch\ntorch.distributed.broadcast(t, 0)",
        "from torch.distributed import all_gather_object\nall_gather_object(out, x)",
        "from torch import distributed\ndistributed.send(t, 1)",
        "import torch.distributed.distributed_c10d as c10d\nc10d.all_gather_into_tensor(o, t)",
        "from torch.distributed.nn.functional import all_gather\nall_gather(t)",
        "import deepspeed.comm as dist\ndist.all_reduce(t)",
        "def f():\n    import torch.distributed as dist\n    dist.broadcast_object_list(b, src=0)",
    ],
)
def test_scan_flags_stray_calls(source):
    assert stray_collectives(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import torch.distributed as dist\ndist.get_rank(); dist.get_world_size(g)",
        "import torch.distributed as dist\ndist.is_initialized()",
        "from megaclip.parallel import collectives\ncollectives.all_reduce(t, 'sum', g)",
        "from megaclip.parallel.collectives import barrier\nbarrier()",
        "x.all_reduce(t)",  # not a torch.distributed module
    ],
)
def test_scan_leaves_other_calls_alone(source):
    assert not stray_collectives(source), source
