"""The package's import structure (issue 10): sub-packages import only down the layers, never in a cycle, and
imports sit at module level except for optional heavy dependencies.

Every module under vipllava_jax/ is read with `ast` (nothing is imported), every import statement counted,
including those inside functions.

  rank 0  models, data       (data imports nothing else from the package; models does not import data)
  rank 1  parallel
  rank 2  checkpoints
  rank 3  generation, training  (peers: neither imports the other)
  rank 4  evals, testing, serving  (peers)
  rank 5  cli

A module may import its own sub-package and sub-packages of a lower rank. The package root (``__init__``) is the
only top-level module, and no module anywhere only re-exports another: one name for each thing (issue 25).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vipllava_jax

PKG_DIR = Path(vipllava_jax.__file__).resolve().parent
ROOT = "vipllava_jax"
RANK = {"models": 0, "data": 0, "parallel": 1, "checkpoints": 2, "generation": 3, "training": 3, "evals": 4,
        "testing": 4, "serving": 4, "cli": 5}
# Imported inside functions on purpose: optional (torch, huggingface_hub: hub downloads) or heavy to import and
# needed on one path only (transformers, tokenizers: a checkpoint's tokenizer, the tiny test processor;
# tensorboardX, which imports torch: a training run's events).
LAZY_OK = {"torch", "transformers", "tokenizers", "huggingface_hub", "tensorboardX"}
# The serving room needs the serve extra (fastapi, uvicorn, pydantic, prometheus_client) at its module level:
# cli/serve.py imports it inside run(), so the other commands neither need the extra nor pay for importing it.
LAZY_OK |= {"vipllava_jax.serving"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([ROOT] + parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


class _Imports(ast.NodeVisitor):
    """(target module, line, inside a function) for every import statement; targets inside the package resolved
    to the deepest module that exists (``from ..data import visual_prompts`` -> vipllava_jax.data.visual_prompts)."""

    def __init__(self, name: str):
        self.name, self.depth, self.found = name, 0, []
        self.base = name if _is_package(name) else name.rpartition(".")[0]

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, node):
        self.found.append((target, node.lineno, self.depth > 0))

    def visit_Import(self, node):
        for a in node.names:
            self._add(_deepest(a.name), node)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.base.split(".")
            base = base[:len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module
        for a in node.names:
            self._add(_deepest(f"{mod}.{a.name}") if mod.split(".")[0] == ROOT else mod, node)


def _deepest(dotted: str) -> str:
    if dotted.split(".")[0] != ROOT:
        return dotted
    parts = dotted.split(".")
    while len(parts) > 1 and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


IMPORTS = {name: _Imports(name) for name in MODULES}
for _name, _visitor in IMPORTS.items():
    _visitor.visit(ast.parse(MODULES[_name].read_text(), str(MODULES[_name])))


def layer(name: str) -> str:
    """The sub-package a module belongs to, "root" for the package's __init__, "shim" for other top-level modules."""
    parts = name.split(".")
    if len(parts) == 1:
        return "root"
    if len(parts) == 2 and not _is_package(name):
        return "shim"
    return parts[1]


def internal_edges():
    for src, v in IMPORTS.items():
        for dst, line, lazy in v.found:
            if dst.split(".")[0] == ROOT:
                yield src, dst, line, lazy


def _where(src, line):
    return f"{MODULES[src].relative_to(PKG_DIR.parent)}:{line}"


def test_every_subpackage_has_a_rank():
    subs = {layer(m) for m in MODULES} - {"root", "shim"}
    assert subs <= set(RANK), f"sub-packages without a rank in the layer table: {sorted(subs - set(RANK))}"


def test_no_import_runs_up_the_layers():
    bad = []
    for src, dst, line, _ in internal_edges():
        ls, ld = layer(src), layer(dst)
        if ls in ("root", "shim") or ls == ld:
            continue
        if ld in ("root", "shim"):
            bad.append(f"{_where(src, line)}: {src} imports {dst}, a top-level "
                       f"{'re-export shim' if ld == 'shim' else 'package root'}; import the sub-package module")
        elif RANK[ld] >= RANK[ls]:
            bad.append(f"{_where(src, line)}: {src} ({ls}, rank {RANK[ls]}) imports {dst} ({ld}, rank {RANK[ld]})")
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def test_no_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in internal_edges():
        ls, ld = layer(src), layer(dst)
        if ls != ld and ls not in ("root", "shim") and ld not in ("root", "shim"):
            graph.setdefault(ls, set()).add(ld)
    assert not _cycles(graph), f"sub-package import cycles: {_cycles(graph)}"


def test_no_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in internal_edges():
        if src != dst and layer(src) != "shim" and layer(dst) != "shim":
            graph.setdefault(src, set()).add(dst)
    assert not _cycles(graph), f"module import cycles: {_cycles(graph)}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one node (or a self loop)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_at_module_level():
    bad = [f"{_where(src, line)}: {dst} imported inside a function"
           for src, v in IMPORTS.items() for dst, line, lazy in v.found
           if lazy and not any(dst == ok or dst.startswith(ok + ".") for ok in LAZY_OK)]
    assert not bad, ("imports inside functions (allowed only for " + ", ".join(sorted(LAZY_OK)) + "):\n  "
                     + "\n  ".join(bad))


def test_no_top_level_modules_but_the_root():
    """Code lives in the sub-packages; the old flat module paths (vipllava_jax.processing, .convert, ...) are gone."""
    extra = sorted(m for m in MODULES if layer(m) == "shim")
    assert not extra, f"top-level modules besides __init__ (give each thing one name, in its sub-package): {extra}"


def _only_reexports(tree: ast.Module) -> bool:
    """A module body of nothing but a docstring, imports, ``__all__`` and ``sys.modules[...] = ...``."""
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and all(
                (isinstance(t, ast.Name) and t.id == "__all__") or
                (isinstance(t, ast.Subscript) and "sys.modules" in ast.unparse(t)) for t in node.targets):
            continue
        return False
    return True


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not _is_package(m)))
def test_no_module_only_reexports_another(name):
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    assert not _only_reexports(tree), f"{name} only re-exports other modules' names: import them from where they " \
                                      f"live (sub-package __init__ files are the one place that gathers names)"


def test_public_paths():
    """The names checks outside the repository call (issue 25), from exactly these paths."""
    import importlib
    for mod, names in {
        "vipllava_jax": ["load_pretrained", "generate", "generate_stream", "sharded_generate", "make_mesh",
                         "pipeline"],
        "vipllava_jax.training": ["loss_fn", "train", "TrainConfig"],
        "vipllava_jax.testing": ["make_tiny_checkpoint", "make_tiny_processor"],
        "vipllava_jax.data.synthetic": ["make_scene", "write_dataset", "DEMO_SCENE"],
        "vipllava_jax.evals": ["evaluate", "run_demo", "heldout_accuracy", "write_heldout", "demo_model_path"],
        "vipllava_jax.cli": ["main"],
    }.items():
        m = importlib.import_module(mod)
        missing = [n for n in names if not hasattr(m, n)]
        assert not missing, f"{mod} lacks {missing}"
