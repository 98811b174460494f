"""No private DeepSpeed attribute is read or written in megaclip/ outside the DeepSpeed fence.

The fence is megaclip/parallel/deepspeed_compat.py: it checks each internal megaclip relies on
(tests/test_deepspeed_compat.py) and offers named functions for them. This walks the package's
syntax trees and flags, in every other module:

1. any attribute whose name is in ``deepspeed_compat.PRIVATE_NAMES`` (read, written or deleted:
   ``x._hp_mapping``, ``engine.checkpoint_engine``), also spelled as a constant string of
   ``getattr`` / ``setattr`` / ``hasattr`` / ``delattr``;
2. any ``_name`` attribute (one leading underscore, not a dunder) on something imported from
   ``deepspeed`` (``PipelineEngine._INSTRUCTION_MAP``, ``ds_comm._x``), or on a name or
   attribute chain ending in ``engine`` or ``optimizer`` (``engine._global_loss``,
   ``self.engine.optimizer._x``: DeepSpeed's engines and optimizers, and ClipEngine, whose
   private methods bench/ once patched; ``self._x`` of megaclip's own classes is not flagged);
3. in a class derived from a DeepSpeed class: ``super()._name`` and methods or class attributes
   named ``_name`` (overriding a private member);
4. any assignment to ``.__class__``.

The public, documented surface (``deepspeed.initialize``, ``engine.train_batch``,
``engine.optimizer``, ``deepspeed.zero.Init``, ...) is not flagged, nor the read-only ZeRO-3
attributes ``ds_shape`` / ``ds_numel`` (a partitioned parameter's full shape and size).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from megaclip.parallel.deepspeed_compat import PRIVATE_NAMES
from tests.ast_util import PACKAGE, chain, strays

FENCE = Path("parallel/deepspeed_compat.py")
ATTR_FUNCS = {"getattr", "setattr", "hasattr", "delattr"}
HOLDERS = ("engine", "optimizer")  # a chain ending in these names holds a DeepSpeed object


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _deepspeed_names(tree: ast.AST) -> set[str]:
    """Local names bound to deepspeed modules or objects by the module's imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "deepspeed":
                    names.add(a.asname or "deepspeed")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "deepspeed"
        ):
            names.update(a.asname or a.name for a in node.names)
    return names


def private_touches(source: str) -> list[tuple[int, str]]:
    """(line, what) of every private DeepSpeed touch in ``source`` (one module's text)."""
    tree = ast.parse(source)
    ds_names = _deepspeed_names(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attr = node.attr
            if attr in PRIVATE_NAMES:
                found.append((node.lineno, f"{ast.unparse(node)} (a fenced DeepSpeed internal)"))
                continue
            if _private(attr):
                parts = chain(node.value)
                if parts and parts[0] in ds_names:
                    found.append((node.lineno, f"{ast.unparse(node)} (private, from deepspeed)"))
                elif parts and parts[-1] != "self" and parts[-1].endswith(HOLDERS):
                    found.append(
                        (node.lineno, f"{ast.unparse(node)} (private member of an engine)")
                    )
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ATTR_FUNCS and len(node.args) >= 2:
                key = node.args[1]
                if isinstance(key, ast.Constant) and key.value in PRIVATE_NAMES:
                    found.append((node.lineno, f"{node.func.id}(..., {key.value!r})"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "__class__":
                    found.append((node.lineno, f"{ast.unparse(target)} = ... (class swap)"))
        elif isinstance(node, ast.ClassDef):
            bases = [chain(b) for b in node.bases]
            if not any(b and b[0] in ds_names for b in bases):
                continue
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Attribute)
                    and _private(sub.attr)
                    and isinstance(sub.value, ast.Call)
                    and isinstance(sub.value.func, ast.Name)
                    and sub.value.func.id == "super"
                ):
                    found.append((sub.lineno, f"super().{sub.attr} in {node.name}"))
            for item in node.body:
                names = []
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names = [item.name]
                elif isinstance(item, ast.Assign):
                    names = [t.id for t in item.targets if isinstance(t, ast.Name)]
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names = [item.target.id]
                for name in names:
                    if _private(name):
                        found.append((item.lineno, f"{node.name}.{name} overrides a private"))
    return sorted(set(found))


def test_no_private_deepspeed_touch_outside_the_fence():
    found = strays(private_touches, {FENCE})
    assert not found, (
        "private DeepSpeed internals outside megaclip/parallel/deepspeed_compat.py (add a named "
        "function with its check there):\n" + "\n".join(found)
    )


def test_the_fence_holds_them():
    """The scan matches real code: the fence itself touches the internals it lists."""
    found = private_touches((PACKAGE / FENCE).read_text(encoding="utf-8"))
    text = " ".join(what for _, what in found)
    for name in ("_INSTRUCTION_MAP", "_hp_mapping", "checkpoint_engine", "ds_tensor", "cdb"):
        assert name in text, name
    assert "class swap" in text


@pytest.mark.parametrize(
    "source",
    [
        "from deepspeed.runtime.pipe.engine import PipelineEngine\nPipelineEngine._INSTRUCTION_MAP",
        "import deepspeed.comm.comm as ds_comm\nds_comm._private_thing()",
        "import deepspeed\ndeepspeed.runtime._x",
        "param._hp_mapping.hp_fragment",
        "x = getattr(param, '_hp_mapping', None)",
        "hasattr(p, 'ds_id')",
        "p.ds_tensor.data.copy_(v)",
        "engine.checkpoint_engine.load = f",
        "engine._global_loss = f",
        "clip_engine.engine._foo()",
        "self.engine.optimizer._bar",
        "ds_optimizer._x = 1",
        "engine.__class__ = Other",
        "opt.overflow_checker.has_overflow_serial = f",
        "getattr(opt, 'fp32_partitioned_groups_flat', None)",
        "from deepspeed.runtime.pipe.engine import PipelineEngine\n"
        "class E(PipelineEngine):\n    def _train_schedule(self):\n        pass",
        "from deepspeed.runtime.pipe.engine import PipelineEngine\n"
        "class E(PipelineEngine):\n    def step(self):\n        super()._exec_backward_pass(0)",
    ],
)
def test_scan_flags_private_touches(source):
    assert private_touches(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import deepspeed\ndeepspeed.initialize(model=m)",
        "engine.train_batch(it); engine.optimizer.step(); engine.module.train()",
        "self._hooks = {}; self._global_loss(a, b, c)",  # megaclip's own private members
        "counter._local",
        "tuple(getattr(p, 'ds_shape', p.shape))",
        "import torch\ntorch._foreach_norm(ts)",
        "class A(Base):\n    def _x(self):\n        return super()._y()",  # not a DeepSpeed class
        "from megaclip.parallel import deepspeed_compat\ndeepspeed_compat.fp32_fragment(p)",
    ],
)
def test_scan_leaves_other_code_alone(source):
    assert not private_touches(source), source
