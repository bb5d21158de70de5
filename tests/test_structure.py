"""The package's shape: small modules with a docstring saying what each owns, and an acyclic import graph."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pykvcompose"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set:
    """Modules of the package that ``path`` imports, at run time (``TYPE_CHECKING`` blocks left out)."""
    name = _name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (base + "." + node.module if node.module else base) if node.level else node.module
            targets = [mod] + [mod + "." + a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.startswith("pykvcompose") and t in MODULE_NAMES and t != name)
    return found


MODULE_NAMES = {_name(p) for p in MODULES}


def test_no_module_is_over_500_lines():
    sizes = {_name(p): len(p.read_text().splitlines()) for p in MODULES}
    assert max(sizes.values()) <= 500, {k: v for k, v in sizes.items() if v > 500}


def test_every_module_says_what_it_owns():
    for p in MODULES:
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc and len(doc) > 20, _name(p)


def test_the_import_graph_is_acyclic():
    graph = {_name(p): _imports(p) for p in MODULES}
    # a package imports its submodules; a submodule importing its own package (for a sibling) is not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join(path + [node])
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])
    assert "pykvcompose.llama" not in set().union(
        *(
            graph[m]
            for m in (
                "pykvcompose.engine",
                "pykvcompose.probing",
                "pykvcompose.rewrite",
                "pykvcompose.compression",
                "pykvcompose.streaming",
                "pykvcompose.support",
                "pykvcompose.session",
            )
        )
    )


def test_every_make_command_the_readme_names_is_a_makefile_target():
    """`make results` was once documented after its rule had been dropped: nothing ran."""
    import re

    root = PACKAGE.parent
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (root / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", (root / "README.md").read_text()))
    assert {"demo", "test", "test-fast"} <= named
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


#: What the project measures itself with: it lives in bench/ (kvbench), never in the installed package.
MEASUREMENT = ("benchmark", "haystack", "stats", "server_load", "runner", "metrics", "report", "tasks")


def test_the_package_holds_no_measurement_code():
    names = {p.relative_to(PACKAGE).with_suffix("").as_posix() for p in MODULES}
    assert not {n for n in names if any(part in MEASUREMENT for part in n.split("/"))}, names
    for p in MODULES:  # no library code writes the README (benchmarks refresh docs pages)
        assert "README" not in p.read_text(), p


def test_the_installed_distribution_holds_no_measurement_code():
    """What `pip install` put on disk (the wheel's file list), not only the source tree."""
    import importlib.metadata

    files = [str(f) for f in importlib.metadata.files("pykvcompose") or []]
    assert any(f.endswith("pykvcompose/llama.py") for f in files), files[:10]
    assert any(f.endswith("pykvcompose/py.typed") for f in files)
    assert not [f for f in files if f.startswith("pykvcompose/") and any(m in f for m in MEASUREMENT)]
    assert not [f for f in files if f.startswith(("bench/", "kvbench/", "tests/"))]


def test_the_readme_is_a_front_door():
    """At most 300 lines, and the two set-up commands first: the measurements live in docs/."""
    readme = (PACKAGE.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]
    for link in __import__("re").findall(r"\]\(((?:docs|bench)/[^)#]+)", readme):
        assert (PACKAGE.parent / link).exists(), link


def test_the_errors_users_catch_import_from_the_top_level():
    import pykvcompose

    for name in ("NativeError", "CorruptStateError", "UnsupportedCacheError", "SessionError", "LlamaRefusedError"):
        assert issubclass(getattr(pykvcompose, name), Exception) and name in pykvcompose.__all__
    assert pykvcompose.SessionError is pykvcompose.session.SessionError
    assert pykvcompose.CorruptStateError is pykvcompose._native.CorruptStateError


def test_the_llama_cpp_python_version_is_written_once():
    """pyproject.toml pins it; the Makefile and CMake read it from there."""
    import re

    root = PACKAGE.parent
    pins = re.findall(r'"llama-cpp-python(?:\[[a-z,]+\])?\s*==\s*([0-9.]+)"', (root / "pyproject.toml").read_text())
    assert len(pins) == 1, pins
    for f in ("Makefile", "CMakeLists.txt"):
        assert pins[0] not in (root / f).read_text(), f
