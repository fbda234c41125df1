"""The package's imports run one way: no module imports, directly or through others, a module that imports it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sffn_lab": ROOT / "sffn_lab", "sffn_lab.kernels": ROOT / "kernels",
            "sffn_lab.experiments": ROOT / "experiments"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules a file imports (module-level or inside functions), resolved to known module names."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    found = modules()
    graph = {}
    for name, path in found.items():
        # a package's __init__ importing its own submodules is the package, not a cycle
        graph[name] = {t for t in imports_of(path, set(found)) if t != name and not (
            path.name == "__init__.py" and t.startswith(name + "."))}
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_config_is_a_leaf():
    found = modules()
    assert imports_of(found["sffn_lab.config"], set(found)) <= {"sffn_lab.errors"}


def test_analysis_does_not_import_the_benchmarks():
    """The layers run one way: bench/ measures with analysis/, never the other way round."""
    found = modules()
    for name, path in found.items():
        if name.startswith("sffn_lab.analysis"):
            upward = {t for t in imports_of(path, set(found)) if t.startswith("sffn_lab.bench")}
            assert not upward, f"{name} imports {sorted(upward)}"


def test_layers_and_kernels_raise_their_own_errors_not_the_clis():
    """A user's mistake is refused when the config is read (``UserError``, sffn_lab.errors); the modules that compute
    raise Python's own errors for a wrong call, as any library does."""
    found = modules()
    for name, path in found.items():
        if name.startswith(("sffn_lab.layers", "sffn_lab.kernels", "sffn_lab.models")):
            assert "sffn_lab.errors" not in imports_of(path, set(found)), name


def test_new_leaves_import_nothing_of_the_package():
    found = modules()
    for leaf in ("sffn_lab.units", "sffn_lab.durations"):
        assert imports_of(found[leaf], set(found)) == set(), leaf


@pytest.mark.parametrize("args", [
    ["train", "--set", "no.such.key=1"],
    ["train", "-c", "/nonexistent.yaml"],
    ["train", "--max-steps", "0"],
    ["eval", "/nonexistent.ckpt"],
    ["eval", "{run}", "--set", "no.such.key=1"],
    ["sample", "/nonexistent"],
    ["sample", "{run}", "--top-k", "0"],
    ["ablate", "/nonexistent.yaml"],
])
def test_a_mistake_is_answered_without_importing_torch_or_lightning(tmp_path, args):
    """What makes an answer take seconds is importing torch and Lightning; the speed itself is measured by
    tools/error_latency.py."""
    (tmp_path / "config.yaml").write_text("")  # only a path that exists
    args = [a.format(run=tmp_path) for a in args]
    probe = ("import sys; sys.argv = ['sffn', *sys.argv[1:]]\n"
             "from sffn_lab.cli import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
