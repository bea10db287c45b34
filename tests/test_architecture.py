"""The shape of the package, as DESIGN.md draws it: checks a reader can run.

Imports are read with `ast` (nothing is imported), module-level and inside functions alike:
a lazy import inside a function is still an arrow between two modules, and a circle made
of lazy imports is still a circle.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "llama_jax"
LOW = ("llama_jax.errors", "llama_jax.generations", "llama_jax.config", "llama_jax.runtime",
       "llama_jax.sharding", "llama_jax.kernels", "llama_jax.attention", "llama_jax.losses",
       "llama_jax.model", "llama_jax.checkpoint")          # checkpoint: the package and all below it
HIGH = ("train", "inference", "interop", "data", "evaluation", "cli")
MAX_LINES = 400
MAX_TOP_MODULES = 12
RUN_OPTION_FIELDS = {"dtype", "param_dtype", "attention_impl", "remat_policy", "layer_loop",
                     "scan_unroll", "fuse_gate_up"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The llama_jax module a dotted name lands in (the longest known prefix), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(name: str) -> set[str]:
    """The llama_jax modules `name` imports, anywhere in its file."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    here = name if _is_package(name) else name.rpartition(".")[0]  # what `from . import` means
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name` the package.
            found |= {_resolve(f"{base}.{a.name}") for a in node.names}
    found.discard(None)
    found.discard(name)
    return found  # type: ignore[return-value]


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a path."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _reachable(start: str) -> dict[str, str]:
    """Every module `start` reaches, mapped to the module that imports it on the way."""
    seen, todo = {start: ""}, [start]
    while todo:
        v = todo.pop()
        for w in GRAPH[v]:
            if w not in seen:
                seen[w] = v
                todo.append(w)
    return seen


def _path(parents: dict[str, str], end: str) -> str:
    chain = [end]
    while parents[chain[-1]]:
        chain.append(parents[chain[-1]])
    return " -> ".join(reversed(chain))


def test_the_import_reader_sees_lazy_and_relative_imports():
    # Guards the checks below against reading nothing: known arrows must be found.
    assert "llama_jax.model" in GRAPH["llama_jax.inference.generate"]
    assert "llama_jax.data.tfds_source" in GRAPH["llama_jax.data.source_kinds"]  # inside open_source
    assert "llama_jax.cli.generate" not in GRAPH["llama_jax.__main__"]  # by string only: importlib
    assert len(MODULES) > 50 and sum(map(len, GRAPH.values())) > 100
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    detail = []
    for comp in cycles:
        edges = [f"{a} -> {b}" for a in comp for b in sorted(GRAPH[a]) if b in comp]
        detail.append("; ".join(edges))
    assert not cycles, "import circles (module-level or inside functions):\n" + "\n".join(detail)


def test_low_floors_never_reach_higher_packages():
    low = [m for m in MODULES if m in LOW or m.startswith("llama_jax.checkpoint.")]
    bad = []
    for m in low:
        parents = _reachable(m)
        bad += [_path(parents, r) for r in parents if r.split(".")[1:2] and r.split(".")[1] in HIGH]
    assert not bad, "low modules reach higher floors:\n" + "\n".join(sorted(bad))


def test_only_main_reaches_the_cli():
    bad = [f"{m} imports {t}" for m, targets in GRAPH.items() for t in targets
           if t.startswith("llama_jax.cli") and not m.startswith("llama_jax.cli") and m != "llama_jax.__main__"]
    # importlib by name counts too: a string naming a cli module outside __main__ and cli/.
    for m, path in MODULES.items():
        if m == "llama_jax.__main__" or m.startswith("llama_jax.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.startswith("llama_jax.cli"):
                bad.append(f"{m} names {node.value!r}")
    assert not bad, "\n".join(bad)


def test_no_file_over_the_line_limit():
    long = {str(p.relative_to(ROOT.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_few_modules_at_the_top():
    top = sorted(p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= MAX_TOP_MODULES, f"{len(top)} modules at the top of llama_jax/: {top}"


def _model_config_fields() -> set[str]:
    from llama_jax.config import ModelConfig
    return {f.name for f in dataclasses.fields(ModelConfig)}


def test_model_config_holds_no_run_options():
    # What a checkpoint is, not how a run executes it (DESIGN.md: runtime.py has those).
    stray = sorted(_model_config_fields() & RUN_OPTION_FIELDS)
    assert not stray, f"run options in ModelConfig: {stray}"
