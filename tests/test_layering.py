"""Dependencies point one way. Read from the source (imports inside functions included, since a
lazy import is still a dependency): smolctl's modules import each other without cycles, the core
never reaches the CLI, Typer or Rich, and CLI commands share code through the core."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "smolctl"
PRESENTATION = {"smolctl.dashboard"}  # the Rich dashboard: a sink the CLI hands to the loop
ENTRY = {"smolctl.__main__"}  # `python -m smolctl`: runs the CLI
CLI_SHARED = {"smolctl.cli", "smolctl.cli.registry", "smolctl.cli.options"}  # what commands may share


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imported(name: str) -> set[str]:
    """Every module `name` imports, anywhere in its source: `from a.b import c` counts as a.b, and
    as a.b.c when that is one of smolctl's modules."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module if node.level == 0 else ".".join(name.split(".")[:-node.level] + [node.module or ""])
            found.add(base.rstrip("."))
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found - {name}


GRAPH = {name: {m for m in imported(name) if m in MODULES} for name in MODULES}


def reach(name: str) -> set[str]:
    """The smolctl modules `name` depends on, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for m in GRAPH[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for m in sorted(graph[name]):
            if state.get(m) == "open":
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m, path + [m])):
                return found
        state[name] = "done"
        return None

    return next((found for name in sorted(graph) if name not in state and (found := visit(name, [name]))), None)


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert "smolctl.errors" in GRAPH["smolctl.config"]  # the graph sees module-level imports
    assert "smolctl.tokenizer" in GRAPH["smolctl.sources"]  # and imports inside functions


def test_smolctl_modules_import_each_other_without_cycles():
    assert cycle(GRAPH) is None, " -> ".join(cycle(GRAPH))


@pytest.mark.parametrize("low, high", [
    ("smolctl.config", "smolctl.sources"),  # model sources resolve into configs, not the reverse
    ("smolctl.config", "smolctl.gguf_io"),
    ("smolctl.checkpoint", "smolctl.data"),  # a checkpoint stores the data state; it doesn't make it
    ("smolctl.generation", "smolctl.sources"),  # generation takes a loaded model; loading.py loads it
])
def test_lower_modules_do_not_reach_higher_ones(low, high):
    assert high not in reach(low)


def test_the_core_reaches_neither_the_cli_nor_typer_nor_rich():
    core = [m for m in MODULES if not m.startswith("smolctl.cli") and m not in PRESENTATION | ENTRY]
    assert "smolctl.train" in core and "smolctl.checkpoint" in core
    for name in core:
        assert not {m for m in reach(name) if m.startswith("smolctl.cli") or m in PRESENTATION}, name
        assert not {m.split(".")[0] for m in imported(name)} & {"typer", "rich", "click"}, name


def test_cli_commands_share_code_through_the_core_not_each_other():
    commands = [m for m in MODULES if m.startswith("smolctl.cli.") and m not in CLI_SHARED]
    assert "smolctl.cli.chat" in commands and "smolctl.cli.generate" in commands
    for name in commands:
        assert not {m for m in GRAPH[name] if m.startswith("smolctl.cli")} - CLI_SHARED, name
