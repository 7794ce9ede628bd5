"""The layering stays true: no import circles, the core never imports its tool folders, and importing the
package (or the CLI, or the torch-free runtime) loads nothing heavy.

Imports are read from the source with `ast` (every `import` statement, at module level or inside a
function, except those under `if TYPE_CHECKING:`), so a circle or a wrong-way import fails here before it
fails somewhere at run time. The tool folders (export/, quantize/, train/) install as
`minigpt4_local.export` etc.; the CLI reaches them through a table of module names, not an import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "minigpt4_local"
TOOLS = ("export", "quantize", "train")
HEAVY = (
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "gptqmodel",
    "llama_cpp",
    "ray",
    "fastapi",
)


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for the core package and the tool folders."""
    found = {}
    for folder, prefix in [(ROOT / PACKAGE, PACKAGE), *[(ROOT / t, f"{PACKAGE}.{t}") for t in TOOLS]]:
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join([prefix, *parts])
            found[name.removesuffix(".__init__")] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    """Project modules `name` imports (resolved, relative imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m in _imports(name, path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_reader_sees_the_imports_it_must() -> None:
    # The checks below are only as good as the import reader: it must resolve relative imports and see
    # imports inside functions (and skip TYPE_CHECKING ones).
    graph = _graph()
    assert f"{PACKAGE}.loader" in graph[f"{PACKAGE}.backends.llamacpp"]  # inside a function
    assert f"{PACKAGE}.prefix_cache" in graph[f"{PACKAGE}.backends.llamacpp"]
    assert f"{PACKAGE}.stitching" in graph[f"{PACKAGE}.prefix_cache"]  # imported inside a function
    assert f"{PACKAGE}.train.data" in graph[f"{PACKAGE}.train.features"]  # relative, module level
    assert len(graph) > 60


def test_no_import_circles() -> None:
    assert _cycle(_graph()) is None, f"import circle: {' -> '.join(_cycle(_graph()) or [])}"


def test_the_core_never_imports_its_tools() -> None:
    tools = tuple(f"{PACKAGE}.{t}" for t in TOOLS)
    wrong = sorted(
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        if not name.startswith(tools)
        for dep in deps
        if dep.startswith(tools)
    )
    assert not wrong, wrong


def test_importing_the_package_and_cli_loads_nothing_heavy() -> None:
    code = (
        "import sys, minigpt4_local, minigpt4_local.cli, minigpt4_local.loader, minigpt4_local.pipeline\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
