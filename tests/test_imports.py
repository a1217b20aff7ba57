"""What importing gradguard costs: no torch.distributed.tensor for unsharded models, no torch for ``--help``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradguard
from gradguard.cli import build_parser

SRC = Path(gradguard.__file__).resolve().parents[1]


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports this checkout's gradguard; return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "PATH": ""}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_and_use_without_torch_distributed_tensor() -> None:
    # The whole public API, monitored and clipped steps on a plain model, a probe: none needs DTensor.
    # (No torch.optim optimizer: constructing one makes torch itself import torch._dynamo and DTensor.)
    code = """
import sys
import torch
import gradguard as gg
from gradguard import *
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
mon, clip = gg.watch(model, console=False), gg.clip.ZClip()
x = torch.randn(16, 4)
for _ in range(3):
    model.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    clip(model.parameters())
    mon.step(loss=loss)
mon.close()
gg.probe(model, x)
print("torch.distributed.tensor" in sys.modules)
"""
    assert _run(code) == "False"


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_cli_help_and_version_import_no_torch(flag: str) -> None:
    code = f"""
import sys
from gradguard.cli import main
try:
    main([{flag!r}])
except SystemExit:
    pass
print(sorted({{m.partition(".")[0] for m in sys.modules}} & {{"torch", "numpy", "gradguard.lab"}}))
"""
    assert _run(code).splitlines()[-1] == "[]"


def test_lazy_help_lists_every_command_as_registered() -> None:
    # The top-level help built from placeholders equals the one built with every sub-command registered.
    assert build_parser(()).format_help() == build_parser().format_help()


def test_every_public_name_resolves() -> None:
    assert all(getattr(gradguard, name) is not None for name in gradguard.__all__)
    assert set(gradguard.__all__) <= set(dir(gradguard))
    with pytest.raises(AttributeError, match="no_such_name"):
        gradguard.no_such_name  # noqa: B018


# --- the import graph of src/gradguard, read from the AST ---------------------------------------------

#: Layers above the statistics: stats/ (and the model adapter at the same level) import none of them.
ABOVE_STATS = ("detect", "monitor", "guard", "preflight", "probe", "report", "sinks", "lab", "cli", "integrations")


def _module_files() -> dict[str, Path]:
    files = {}
    for path in (SRC / "gradguard").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, files: dict[str, Path], *, type_checking: bool) -> set[str]:
    """gradguard modules that ``module`` imports anywhere: at module level, in functions, in methods.

    ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``. Imports under
    ``if TYPE_CHECKING:`` never run and count only when ``type_checking`` is set.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_checking:
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]))
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for alias in child.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _graph(*, type_checking: bool) -> dict[str, set[str]]:
    files = _module_files()
    # The package root loads its public names lazily (``__getattr__``); its TYPE_CHECKING imports name them,
    # so they are its real dependencies.
    return {m: _imports(m, p, files, type_checking=type_checking or m == "gradguard") for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_module_and_function_level_imports() -> None:
    graph = _graph(type_checking=False)
    assert "gradguard.stats.distributed" in graph["gradguard.stats.norms"]  # module level
    assert "gradguard.lab.registry" in graph["gradguard.lab.command"]  # inside a function
    assert "gradguard.monitor" in graph["gradguard"]  # the root's lazy public names


def test_no_import_cycle_lazy_or_not() -> None:
    assert _cycles(_graph(type_checking=False)) == []


def test_stats_and_adapt_import_nothing_from_the_layers_above() -> None:
    graph = _graph(type_checking=True)
    above = tuple(f"gradguard.{layer}" for layer in ABOVE_STATS)
    bottom = [m for m in graph if m.startswith("gradguard.stats") or m == "gradguard.adapt"]
    assert len(bottom) > 5
    upward = {m: sorted(d for d in graph[m] if d == "gradguard" or d.startswith(above)) for m in bottom}
    assert {m: d for m, d in upward.items() if d} == {}


def test_the_middle_layer_imports_nothing_from_reports_integrations_or_the_cli() -> None:
    # detect -> monitor / guard / probe -> report / integrations / attach / lab / CLI: data flows one way
    graph = _graph(type_checking=True)
    middle = ("gradguard.detect", "gradguard.monitor", "gradguard.guard")
    above = ("report", "integrations", "attach", "lab", "cli")

    def is_above(d: str) -> bool:
        return any(d == f"gradguard.{a}" or d.startswith(f"gradguard.{a}.") for a in above)

    mods = [m for m in graph if m.startswith(middle)]
    assert len(mods) > 20
    upward = {m: sorted(d for d in graph[m] if is_above(d)) for m in mods}
    assert {m: d for m, d in upward.items() if d} == {}


@pytest.mark.parametrize("argv", [["lab", "list"], ["report", "DIR"], ["probe", "m.py:f", "--input-shape", "2x3"]])
def test_a_named_command_is_registered_in_full(argv: list[str]) -> None:
    # Naming a command registers its module (``report`` comes with ``lab``); the others stay placeholders.
    args = build_parser(argv[:1]).parse_args(argv)
    assert callable(args.func)


def test_integrations_as_module_is_a_deprecated_alias_of_adapt() -> None:
    from gradguard import adapt, integrations

    lin = torch.nn.Linear(2, 2)
    with pytest.warns(DeprecationWarning, match="gradguard.adapt.as_module"):
        assert integrations.as_module(lin) is adapt.as_module(lin) is lin
    with pytest.warns(DeprecationWarning, match="gradguard.adapt.is_keras_model"):
        assert integrations.is_keras_model(lin) is adapt.is_keras_model(lin) is False
