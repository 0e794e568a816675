"""The package picture in docs/ARCHITECTURE.md is the code's: every first-party import (at the top of a module
or inside a function) goes from a room to a room on a lower layer, and every room of the code is in the
picture. A new import that breaks the layering fails here, naming the file and the line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "antimatter"
# the one import against the layers, lazily: config checks disabled rule names against data/filters' list
EXCEPTIONS = {("config", "antimatter.data.filters")}


def layers() -> dict[str, int]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text("utf-8")
    block = re.search(r"<!-- layers -->\n```\n(.*?)```\n<!-- /layers -->", text, re.S)
    assert block, "docs/ARCHITECTURE.md lost its <!-- layers --> block"
    out: dict[str, int] = {}
    for line in block.group(1).splitlines()[1:]:
        layer, *rooms = line.split("|")[0].split()
        out.update({room: int(layer) for room in rooms})
    return out


def room_of(module: str) -> str:
    """antimatter.data.prepare -> data/, antimatter.checkpoint -> checkpoint."""
    first = module.split(".")[1]
    return f"{first}/" if (PACKAGE / first).is_dir() else first


def first_party_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("antimatter."):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("antimatter.")]
    return out


def modules() -> list[tuple[Path, str]]:
    return [(p, room_of("antimatter." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)))
            for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py" or p.parent != PACKAGE]


def test_every_room_of_the_code_is_in_the_picture():
    missing = sorted({room for _, room in modules()} - set(layers()))
    assert not missing, f"rooms missing from the layers in docs/ARCHITECTURE.md: {missing}"


def test_imports_point_to_lower_layers():
    layer = layers()
    wrong = []
    for path, room in modules():
        for line, target in first_party_imports(path):
            to = room_of(target)
            if to == room or (room, target) in EXCEPTIONS:
                continue
            if layer[to] >= layer[room]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (layer {layer[to]} from {layer[room]})")
    assert not wrong, "imports against the layers of docs/ARCHITECTURE.md:\n" + "\n".join(wrong)

