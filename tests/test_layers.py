"""The layers of DESIGN.md, held by parsing every module's imports (no import is executed).

core (0) <- adapters (1) <- pipelines (2) <- cli (3): a module may import its own layer and the
ones below, never one above; the in-package import graph has no cycle; core imports no
third-party package but numpy, scipy, torch and yaml.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vfsearch"
LAYERS = {"core": 0, "adapters": 1, "pipelines": 2, "cli": 3, "__main__": 3}
CORE_THIRD_PARTY = {"numpy", "scipy", "torch", "yaml"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path, modules: set[str], here: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported module, line, only under TYPE_CHECKING) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for name in names:
            found.append((name, node.lineno, _type_checking_only(node, parents)))
    return found


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    mods = all_modules()
    return mods, {m: imports(p, set(mods)) for m, p in mods.items()}


def test_the_three_layers_exist_and_every_module_sits_in_one():
    mods = all_modules()
    for folder in ("core", "adapters", "pipelines"):
        assert f"vfsearch.{folder}" in mods
    loose = [m for m in mods if layer(m) is None and m != "vfsearch"]
    assert not loose, f"modules outside the layers: {loose}"


def upward(edges: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    out = []
    for mod, found in edges.items():
        for target, line, _ in found:
            src, dst = layer(mod), layer(target) if target.startswith("vfsearch.") else None
            if src is not None and dst is not None and dst > src:
                out.append(f"{mod}:{line} imports {target}")
    return out


def test_no_module_imports_a_higher_layer():
    _, edges = graph()
    bad = upward(edges)
    assert not bad, "a lower layer imports a higher one:\n" + "\n".join(bad)


def test_core_imports_only_numeric_third_party_packages():
    mods, edges = graph()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for mod, found in edges.items():
        if layer(mod) != 0:
            continue
        for target, line, _ in found:
            top = target.split(".")[0]
            if top not in stdlib and top != "vfsearch" and top not in CORE_THIRD_PARTY:
                bad.append(f"{mods[mod].relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not bad, "core must stay pure compute:\n" + "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_in_package_import_graph_has_no_cycle():
    mods, found = graph()
    edges = {
        m: {
            t for t, _, tc in f if t in mods and t != m and not tc and not m.startswith(t + ".")
        }  # a module may import its own package
        for m, f in found.items()
    }
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_cycle_finder_finds_a_planted_cycle(edges, expected):
    assert find_cycle(edges) == expected


def test_layer_check_catches_a_planted_upward_import(tmp_path):
    planted = tmp_path / "geometry.py"
    planted.write_text(
        (PACKAGE / "core" / "geometry.py").read_text(encoding="utf-8")
        + "\n\ndef late():\n    from vfsearch.pipelines import predict\n",
        encoding="utf-8",
    )
    mods = set(all_modules())
    found = imports(planted, mods, here="vfsearch.core.geometry")
    assert upward({"vfsearch.core.geometry": found}) == [
        f"vfsearch.core.geometry:{len(planted.read_text(encoding='utf-8').splitlines())} imports "
        "vfsearch.pipelines.predict"
    ]
