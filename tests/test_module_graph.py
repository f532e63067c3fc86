"""The package's imports, read from the source (docs/architecture.md, "Package map and import direction"): the model
folder (`lavcap_hf/model/`) imports nothing outside itself, and no modules import each other at load time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lavcap_hf"
MODEL_SET = "model"
"""The subpackage a saved model folder carries and loads with trust_remote_code, without this package's tooling."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def in_model_set(name: str) -> bool:
    return name.startswith(MODEL_SET + ".")


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
def test_the_model_folder_imports_nothing_outside_it(name: str) -> None:
    """transformers' remote-code loader copies a saved folder's modules flat, side by side, and resolves only
    single-dot imports between them: a model-set module may import the library and its siblings, nothing else."""
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            where = f"{name}: from {'.' * node.level}{node.module or ''} import ..."
            assert node.level in (0, 1), f"{where} leaves the model folder"
            assert node.level == 1 or not (node.module or "").startswith("lavcap_hf"), where
            if node.level == 1:
                assert node.module, f"{where}: import the sibling module by name"
                assert f"{MODEL_SET}.{node.module.split('.')[0]}" in modules(), f"{where}: no such sibling"
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("lavcap_hf") for alias in node.names), name


def test_the_model_folder_is_flat_and_holds_the_remote_code_entries() -> None:
    folder = PACKAGE / MODEL_SET
    assert not [path for path in folder.rglob("*.py") if path.parent != folder]
    entries = {"configuration_lavcap", "modeling_lavcap", "processing_lavcap", "feature_extraction_lavcap"}
    assert {f"{MODEL_SET}.{entry}" for entry in entries | {"pipeline_lavcap"}} <= set(modules())


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
    "entry",
    [
        f"{MODEL_SET}.{m}"
        for m in ("modeling_lavcap", "processing_lavcap", "feature_extraction_lavcap", "pipeline_lavcap")
    ],
)
def test_remote_code_entries_import_what_they_reach(entry: str) -> None:
    """transformers 4.55 copies into its remote-code cache only the direct relative imports of the file it loads (the
    config's first, then the entry's), so a saved folder loads there only if each entry imports directly every
    model-set module it reaches that the config does not."""
    config = f"{MODEL_SET}.configuration_lavcap"
    copied = {config} | reachable(config) | package_imports(entry, modules()[entry], top_level_only=False)
    assert reachable(entry) <= copied, f"{entry} reaches {sorted(reachable(entry) - copied)} only indirectly"


def test_a_saved_folder_carries_the_model_folder_and_nothing_else(tmp_path: Path) -> None:
    """`save_pretrained` of the model and the processor copies the model set's modules as remote code: every
    module of `lavcap_hf/model/` (the entries and what they import), and no tooling."""
    from lavcap_hf import LavCapForConditionalGeneration, LavCapProcessor
    from lavcap_hf.testing import tiny_lavcap_config, word_level_tokenizer

    tokenizer = word_level_tokenizer(["a dog barks"])
    audio, video = tokenizer.convert_tokens_to_ids(["<|audio|>", "<|video|>"])
    config = tiny_lavcap_config(vocab_size=len(tokenizer), audio_token_id=audio, video_token_id=video)
    LavCapForConditionalGeneration(config).save_pretrained(tmp_path)
    LavCapProcessor.from_model_config(config, tokenizer).save_pretrained(tmp_path)
    model_set = {path.name for path in (PACKAGE / MODEL_SET).glob("*.py") if path.name != "__init__.py"}
    assert {path.name for path in tmp_path.glob("*.py")} == model_set
