"""Tests for the package layout: layers point down, no import cycles, and a light core.

Every module under `jaxckpt/` is parsed with `ast` (nothing is imported), so these tests see
imports inside functions too: a lazy import is still an arrow between two modules.
"""

import ast
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxckpt"

# Bottom to top; a module may import its own layer and the layers below it, never one above.
# `jaxckpt/__init__.py` is the public face over all of them and is not in a layer.
LAYERS = (
    ("jaxckpt.types", "jaxckpt.errors", "jaxckpt.config_strings"),
    ("jaxckpt.tree",),
    ("jaxckpt.grafting",),
    ("jaxckpt.train", "jaxckpt.checkpoint"),
    ("jaxckpt.weights",),
    ("jaxckpt.runner",),
    ("jaxckpt.cli", "jaxckpt.__main__"),
)

# Upward arrows that exist today and are being removed, each with the reason it is still here.
# The test fails when one disappears, so this list only shrinks.
PENDING_UPWARD: set[tuple[str, str]] = set()

# What only the runner and the command line need (the `runner` extra): the core layers must not
# import these at all, so `pip install jaxckpt` without the extra can graft, train and checkpoint.
RUNNER_ONLY = ("tensorflow_datasets", "grain", "array_record", "matplotlib", "ml_collections", "absl",
               "tqdm", "tensorboardX", "importlib_resources")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """`(imported module, line)` for every import in the file, resolved to a module where it names one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from a.b import c` imports the module a.b.c when there is one, else names in a.b.
            out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno)
                    for a in node.names]
    return out


def _internal_graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(name, path) if m.startswith("jaxckpt") and m != name}
            for name, path in MODULES.items()}


def _layer(name: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_module_has_a_layer():
    assert [n for n in MODULES if n != "jaxckpt" and _layer(n) is None] == []


def test_every_internal_import_names_a_module_that_exists():
    missing = [f"{MODULES[n].relative_to(ROOT)}:{line} imports {m}" for n, p in MODULES.items()
               for m, line in _imports(n, p) if m.startswith("jaxckpt") and m not in MODULES]
    assert missing == []


def test_imports_point_down_the_layers():
    upward = set()
    for name, targets in _internal_graph().items():
        if name == "jaxckpt":
            continue
        upward |= {(name, t) for t in targets if t != "jaxckpt" and _layer(t) > _layer(name)}
    order = " < ".join("/".join(m.rpartition(".")[2] for m in layer) for layer in LAYERS)
    assert upward - PENDING_UPWARD == set(), f"imports pointing up the layers ({order})"
    assert PENDING_UPWARD - upward == set(), "fixed: remove these from PENDING_UPWARD"


def test_no_import_cycles():
    graph = _internal_graph()
    graph.pop("jaxckpt")  # the facade imports everything lazily; nothing may import it back
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_library_never_imports_its_own_facade():
    assert [n for n, targets in _internal_graph().items() if "jaxckpt" in targets and n != "jaxckpt"] == []


def test_core_layers_import_no_runner_only_package():
    runner = _layer("jaxckpt.runner")
    found = [f"{MODULES[n].relative_to(ROOT)}:{line} imports {m}" for n, p in MODULES.items()
             if n != "jaxckpt" and _layer(n) < runner
             for m, line in _imports(n, p) if m.split(".")[0] in RUNNER_ONLY]
    assert found == []


def test_the_public_core_loads_no_runner_package():
    # flax and orbax import absl.logging, which imports absl.flags: measure what jaxckpt adds on top
    # of its core dependencies, and check that those bring in nothing else of the list.
    forbidden = ("tensorflow_datasets", "grain", "matplotlib", "ml_collections", "absl.flags", "tqdm",
                 "tensorboardX")
    script = textwrap.dedent(f"""
        import sys
        import flax.linen, jax, optax, orbax.checkpoint, tensorstore
        baseline = set(sys.modules)
        import jaxckpt
        jaxckpt.graft; jaxckpt.load_params; jaxckpt.CheckpointManager; jaxckpt.TrainState
        forbidden = {forbidden!r}
        print(sorted(m for m in forbidden if m in sys.modules and m not in baseline))
        print(sorted(m for m in forbidden if m in baseline and m != "absl.flags"))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    added_by_jaxckpt, loaded_by_dependencies = out.stdout.split("\n")[:2]
    assert added_by_jaxckpt == "[]"
    assert loaded_by_dependencies == "[]"

