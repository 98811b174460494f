"""Shared by the source-scanning tests (collectives, DeepSpeed internals): the package's files
and the findings of a scanner over them."""

from __future__ import annotations

import ast
from collections.abc import Callable, Container
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megaclip"


def strays(scan: Callable[[str], list[tuple[int, str]]], allowed: Container[Path]) -> list[str]:
    """``megaclip/<file>:<line>: <finding>`` of ``scan`` over every package file not allowed."""
    out = []
    for path in sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts):
        rel = path.relative_to(PACKAGE)
        if rel in allowed:
            continue
        out += [f"megaclip/{rel}:{line}: {what}" for line, what in scan(path.read_text("utf-8"))]
    return out


def chain(node: ast.AST) -> list[str] | None:
    """['a', 'b', 'c'] of a Name/Attribute chain a.b.c, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return list(reversed(parts))
    return None
