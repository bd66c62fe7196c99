"""The shape that keeps the pipeline changeable: stages never import each other, no import cycles (lazy
imports inside functions count too), every spec has a stage module, and store names live in artifacts."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from pipeline.stages import SPECS, STAGES, spec

PKG = Path(__file__).resolve().parents[1] / "pipeline"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every pipeline module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline") and not node.level:
            out.add(node.module)
            # "from pipeline.stages import judge" imports the module pipeline.stages.judge
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def test_no_stage_imports_another_stage():
    stage_modules = {f"pipeline.stages.{s}" for s in STAGES}
    offenders = [f"{name} imports {dep}" for name, deps in _graph().items() if name in stage_modules
                 for dep in deps if dep in stage_modules]
    assert not offenders, "; ".join(offenders)


def test_no_import_cycles():
    # a package's __init__ importing its own submodules is a re-export, not a cycle
    edges = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


@pytest.mark.parametrize("stage", STAGES)
def test_every_spec_has_a_stage_module(stage):
    module = importlib.import_module(spec(stage).module)
    assert callable(getattr(module, "run", None))


def test_specs_are_in_dependency_order():
    seen: set[str] = set()
    for s in SPECS:
        assert set(s.inputs) <= seen, f"{s.name} reads {set(s.inputs) - seen} before they run"
        seen.add(s.name)


def test_stage_modules_use_artifact_names_not_bare_file_names():
    """Store names belong to pipeline/artifacts.py: ``ctx.key("essays.jsonl")`` in a stage is a second copy."""
    bare = re.compile(r"""key\([^)]*["'][\w./-]+\.(jsonl|json|parquet|png|html|md)["']""")
    offenders = []
    for stage in STAGES:
        path = PKG / "stages" / f"{stage}.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if bare.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_llm_package_is_a_library():
    """pipeline/llm/ (client, runner, server) imports no stage machinery: pipeline.items puts the runner into a
    stage. Its functions fit on a screen (80 lines)."""
    offenders = [f"{name} imports {dep}" for name, deps in _graph().items() if name.startswith("pipeline.llm")
                 for dep in deps if dep == "pipeline.context" or dep.startswith("pipeline.stages")]
    assert not offenders, "; ".join(offenders)
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in (PKG / "llm").glob("*.py") for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, ", ".join(long)
