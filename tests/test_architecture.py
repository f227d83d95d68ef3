"""The package DAG: jaxsae is the ground and never reaches lime_jax; no import cycles inside either package."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jaxsae", "lime_jax")


def _modules() -> dict[str, pathlib.Path]:
    """{dotted module name: file} of both packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def _imports(path: pathlib.Path, top_level_only: bool) -> set[str]:
    """Every module named by an import statement in the file (function-local ones too, unless top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import mod`
    return names


def _strings(path: pathlib.Path) -> list[str]:
    """String constants of the code that are not docstrings (a dynamic import would hide in one)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


MODULES = _modules()


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith("jaxsae")])
def test_jaxsae_never_names_lime_jax(name):
    path = MODULES[name]
    assert not [m for m in _imports(path, top_level_only=False) if m.split(".")[0] == "lime_jax"]
    assert not [s for s in _strings(path) if s.startswith("lime_jax")]


def test_no_import_cycle_between_modules():
    """Depth-first search over the module-level import graph of both packages."""
    graph = {m: sorted(i for i in _imports(f, top_level_only=True) if i in MODULES and i != m)
             for m, f in MODULES.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_importing_all_of_jaxsae_loads_no_lime_jax():
    """At run time too (an import the AST walk missed would show here)."""
    mods = ", ".join(m for m in MODULES if m.startswith("jaxsae.") and not m.endswith("__main__"))
    code = f"import sys, importlib\nfor m in '{mods}'.split(', '): importlib.import_module(m)\n" \
           "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'lime_jax')\nassert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
