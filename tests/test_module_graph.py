"""The package's imports, read from the source (docs/architecture.md, "Module map and import direction"): the model
set imports nothing from the tooling, and no modules import each other at load time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lavcap_hf"
MODEL_SET_PREFIXES = ("configuration_", "modeling_", "processing_", "feature_extraction_", "pipeline_")
MODEL_SET_MODULES = {"optimal_transport", "media", "_compat", "checkpoint_files"}
"""What a saved model folder carries and loads with trust_remote_code, without this package's tooling."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def in_model_set(name: str) -> bool:
    return name in MODEL_SET_MODULES or name.startswith(MODEL_SET_PREFIXES)


def package_imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The modules of this package that `name` imports (only those run when it loads, with `top_level_only`)."""
    known = modules()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = _outside_functions(tree) if top_level_only else list(ast.walk(tree))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in nodes:
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue  # absolute imports of lavcap_hf are not used inside the package
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        stem = ".".join([*base, node.module] if node.module else base)
        for alias in node.names:
            target = f"{stem}.{alias.name}".lstrip(".")
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _outside_functions(tree: ast.AST) -> list[ast.AST]:
    """The nodes of `tree` that run when the module loads (not inside a function body)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            stack.extend(ast.iter_child_nodes(node))
    return found


@pytest.mark.parametrize("name", sorted(n for n in modules() if in_model_set(n)))
def test_model_set_imports_no_tooling(name: str) -> None:
    tooling = {m for m in package_imports(name, modules()[name], top_level_only=False) if not in_model_set(m)}
    assert not tooling, f"{name} imports tooling: {sorted(tooling)}"


def test_no_import_circles_at_load_time() -> None:
    graph = {name: package_imports(name, path, top_level_only=True) for name, path in modules().items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 20  # the whole package was read


def reachable(name: str, top_level_only: bool = False) -> set[str]:
    """Every module of this package that importing `name` may load."""
    graph = {n: package_imports(n, p, top_level_only) for n, p in modules().items()}
    found, stack = set(), [name]
    while stack:
        for target in graph[stack.pop()] - found:
            found.add(target)
            stack.append(target)
    return found


@pytest.mark.parametrize(
    "entry", ["modeling_lavcap", "processing_lavcap", "feature_extraction_lavcap", "pipeline_lavcap"]
)
def test_remote_code_entries_import_what_they_reach(entry: str) -> None:
    """transformers 4.55 copies into its remote-code cache only the direct relative imports of the file it loads (the
    config's first, then the entry's), so a saved folder loads there only if each entry imports directly every
    model-set module it reaches that the config does not."""
    config = "configuration_lavcap"
    copied = {config} | reachable(config) | package_imports(entry, modules()[entry], top_level_only=False)
    assert reachable(entry) <= copied, f"{entry} reaches {sorted(reachable(entry) - copied)} only indirectly"
