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


# --------------------------------------------------------------------------- the spec says it, not the name


def _string_constants(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_stage_name_literal_outside_the_stages_package():
    """Logic picked by a stage's name belongs in its StageSpec: ``"teacher"`` spelt anywhere in pipeline/ but
    pipeline/stages/ is a branch on a name (or a second copy of it)."""
    offenders = [f"{path.relative_to(PKG.parent)}:{line}: {value!r}"
                 for path in sorted(PKG.rglob("*.py")) if "stages" not in path.relative_to(PKG).parts
                 for line, value in _string_constants(path) if value in STAGES]
    assert not offenders, "\n".join(offenders)


def test_the_literal_check_sees_a_branch_on_a_name(tmp_path):
    """The check above is not blind: the kind of line it exists for is found."""
    bad = tmp_path / "objects.py"
    bad.write_text('def secrets(stage):\n    return stage == "teacher"\n')
    assert [v for _, v in _string_constants(bad) if v in STAGES] == ["teacher"]


def test_reading_an_undeclared_input_fails_with_one_line(tmp_path):
    from pipeline.config import load_config
    from pipeline.context import StageContext
    from pipeline.errors import PipelineError
    from pipeline.store import open_store

    ctx = StageContext(load_config(overrides=["run.id=r"]), open_store(str(tmp_path)), "finetune")
    assert ctx.input_key("dataset", "x") == "r/dataset/x"  # declared
    assert ctx.key("y") == ctx.input_key("finetune", "y")  # its own folder
    with pytest.raises(PipelineError) as err:
        ctx.input_key("teacher", "essays.jsonl")
    assert "'finetune' reads stage 'teacher' but does not declare it" in str(err.value)
    assert "\n" not in str(err.value)


def test_require_without_arguments_checks_every_declared_input(tmp_path):
    from pipeline.config import load_config
    from pipeline.context import StageContext
    from pipeline.errors import MissingInput
    from pipeline.store import open_store

    config, store = load_config(overrides=["run.id=r"]), open_store(str(tmp_path))
    generate = StageContext(config, store, "generate")  # inputs: dataset, finetune
    StageContext(config, store, "dataset").complete()
    with pytest.raises(MissingInput, match="needs stage 'finetune'"):
        generate.require()
    StageContext(config, store, "finetune").complete()
    generate.require()


def test_stage_names_follow_the_rule():
    from pipeline.stages import StageSpec

    for name in STAGES:
        assert re.fullmatch(r"[a-z][a-z0-9-]*", name)
    assert StageSpec("split-charts", (), {}, "x").module == "pipeline.stages.split_charts"
    for bad in ("Teacher", "split_charts", "2nd", ""):
        with pytest.raises(ValueError, match="stage name"):
            StageSpec(bad, (), {}, "x")


def _shipped_configs() -> list[Path]:
    root = PKG.parent
    return sorted(root.glob("configs/*.yaml")) + sorted(root.glob("k8s/overlays/*/run.yaml"))


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(PKG.parent)))
def test_spec_accessors_resolve_on_every_shipped_config(path):
    """The typed accessors (no "section.field" strings) give numbers on every shipped config: a typo in one
    fails here, not at render or run time."""
    from pipeline.config import LLMSection, load_config

    config = load_config(path)
    for s in SPECS:
        assert s.shard_count(config) is None or s.shard_count(config) >= 1
        assert s.gpu_count(config) >= 0
        assert isinstance(s.launcher(config), list)
        if s.llm:
            assert isinstance(config.endpoint(s.llm), LLMSection)


def test_launcher_is_torchrun_only_when_the_config_asks_for_processes():
    from pipeline.config import load_config

    finetune = spec("finetune")
    assert finetune.launcher(load_config(overrides=["finetune.gpus=1"])) == []
    assert finetune.launcher(load_config(overrides=["finetune.gpus=0"])) == []
    two = finetune.launcher(load_config(overrides=["finetune.gpus=2"]), python="py")
    assert two[:3] == ["py", "-m", "torch.distributed.run"] and "--nproc-per-node=2" in two


# --------------------------------------------------------------------------- readable units, one home per thing


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_longer_than_80_lines():
    long = [f"{p.relative_to(PKG.parent)}:{line} {name} ({n} lines)" for p in sorted(PKG.rglob("*.py"))
            for name, line, n in _functions(p) if n > 80]
    assert not long, "\n".join(long)


def test_llm_package_is_a_library():
    """pipeline/llm/ (client, server, item runner) imports no stage machinery."""
    offenders = [f"{name} imports {dep}" for name, deps in _graph().items() if name.startswith("pipeline.llm")
                 for dep in deps if dep == "pipeline.context" or dep.startswith("pipeline.stages")]
    assert not offenders, "; ".join(offenders)


def test_the_version_is_written_once():
    from pipeline import __version__

    root = PKG.parent
    skip = {".git", ".venv", "build", "artifacts", "fixtures", "__pycache__", ".pytest_cache", ".ruff_cache"}
    files = [p for p in root.rglob("*") if p.is_file() and not skip & set(p.relative_to(root).parts)
             and not any(part.endswith(".egg-info") for part in p.relative_to(root).parts)  # pip install -e
             and p.parts[-2:-1] != ("tests",)
             and p.suffix in {".py", ".toml", ".yaml", ".yml", ".sh", ".txt", ""} | {".cfg"}]
    holders = [str(p.relative_to(root)) for p in files  # generated files (skaffold.yaml) are checked to be in sync
               if not p.read_text(encoding="utf-8", errors="ignore").startswith("# GENERATED") and re.search(rf"(?<![\d.]){re.escape(__version__)}(?![\d.])", p.read_text(encoding="utf-8", errors="ignore"))]
    assert holders == ["pipeline/__init__.py"], holders


def test_architecture_doc_names_every_module():
    """docs/architecture.md is the map: every top-level module and every subpackage of pipeline/ is on it."""
    doc = (PKG.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    places = [f"pipeline/{p.name}" for p in PKG.glob("*.py") if p.name != "__init__.py"]
    places += [f"pipeline/{p.name}/" for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert not [p for p in places if f"`{p}`" not in doc and f"`{p}" not in doc]
