"""The package's layers, checked from the source (docs/architecture.md).

- the application (simcore.isc) uses only simcore's public names;
- importing simcore does not import the application;
- no module of simcore imports another module's private (underscore) names;
- simcore's modules import each other without a cycle (imports inside functions count).
"""
import ast
import os
import subprocess
import sys

import simcore
from conftest import TESTS_DIR, subprocess_env

PACKAGE = os.path.dirname(os.path.abspath(simcore.__file__))


def _modules():
    """{module name: source} of every simcore/**/*.py."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                with open(path, encoding="utf-8") as fh:
                    out[name] = fh.read()
    return out


def _absolute(module_name, is_package, node):
    """The absolute module an ImportFrom node names, from inside ``module_name``."""
    if node.level == 0:
        return node.module or ""
    parts = module_name.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module_name, source, modules):
    """(line, imported simcore module, names taken from it) for each import statement."""
    is_package = module_name in modules and any(m.startswith(module_name + ".") for m in modules)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(module_name, is_package, node)
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in modules:          # `from simcore.margin import engine` imports a module
                    yield node.lineno, sub, []
                else:
                    yield node.lineno, mod, [a.name]


def non_public_simcore_uses(source):
    """(line, name) of each use of simcore outside its public names (``simcore.__all__``) and simcore.isc."""
    allowed = set(simcore.__all__) | {"isc"}

    def module_ok(mod):                  # an absolute module path
        return mod == "simcore" or mod == "simcore.isc" or mod.startswith("simcore.isc.") or \
            not (mod + ".").startswith("simcore.")

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if not module_ok(a.name)]
        elif isinstance(node, ast.ImportFrom):
            # relative imports are written from inside simcore/isc/: level 1 is simcore.isc, level 2 simcore
            base = {0: "", 1: "simcore.isc", 2: "simcore"}.get(node.level, "simcore")
            mod = ".".join(p for p in (base, node.module) if p)
            if not module_ok(mod):
                found.append((node.lineno, mod))
            elif mod == "simcore":
                found += [(node.lineno, f"simcore.{a.name}") for a in node.names if a.name not in allowed]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "simcore" \
                and node.attr not in allowed:
            found.append((node.lineno, f"simcore.{node.attr}"))
    return found


def test_the_application_uses_only_public_simcore_names():
    bad = ("from simcore.search.cosine_topk import cosine_topk\nimport simcore.dispatch\nfrom simcore import _C\n"
           "from .. import margin\nimport simcore\nsimcore.dispatch.use_compiled(None)\n")
    assert [line for line, _ in non_public_simcore_uses(bad)] == [1, 2, 3, 4, 6]
    ok = "import simcore\nfrom simcore import cosine_topk\nfrom simcore.isc import metrics\nfrom . import augment\n" \
         "simcore.arcface_partial\n"
    assert non_public_simcore_uses(ok) == []
    for name, source in _modules().items():
        if name.startswith("simcore.isc"):
            assert non_public_simcore_uses(source) == [], name


def test_importing_simcore_leaves_the_application_alone():
    code = "import sys, simcore; print(sorted(m for m in sys.modules if m.startswith('simcore.isc')))"
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=TESTS_DIR, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    found = [(name, line, f"{mod}.{n}") for name, src in modules.items()
             for line, mod, names in _imports(name, src, modules) if mod.startswith("simcore")
             for n in names if n.startswith("_") and not n.startswith("__") and mod + "." + n != "simcore._C"]
    assert found == []
    # the check can fail
    assert list(_imports("simcore.margin.head", "from simcore.margin.engine import _Block\n", modules)) == \
        [(1, "simcore.margin.engine", ["_Block"])]


def test_no_import_cycle_between_simcore_modules():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, src in modules.items():
        for _, mod, _ in _imports(name, src, modules):
            # a module depends on what it imports; a package's __init__ re-exporting its own
            # submodules is not a dependency of those submodules
            if mod in modules and mod != name and not mod.startswith(name + "."):
                graph[name].add(mod)
    for name in list(graph):                    # importing a.b.c runs a/__init__ and a/b/__init__ first:
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        for parent in parents:                  # the parent package is not a dependency to count as a cycle
            graph[name].discard(parent)

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in (cycle_from(m) for m in graph) if c]
    assert cycles == [], cycles
