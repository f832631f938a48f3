"""Rooms a newcomer can hold in their head: no module of the package over 400 lines, no class over 200."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "proxyclip"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_FILE, MAX_CLASS = 400, 200


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_class_sizes(path):
    text = path.read_text()
    n = len(text.splitlines())
    assert n <= MAX_FILE, f"{path.relative_to(PACKAGE)} has {n} lines (at most {MAX_FILE}): split it"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS, f"class {node.name} in {path.name} has {size} lines (at most {MAX_CLASS})"


def test_every_module_is_seen():
    assert len(MODULES) > 20 and PACKAGE / "pipeline.py" in MODULES
