"""The package's import structure (issue 10): sub-packages import only down the layers, never in a cycle, and
imports sit at module level except for optional heavy dependencies.

Every module under vipllava_jax/ is read with `ast` (nothing is imported), every import statement counted,
including those inside functions.

  rank 0  models, data       (data imports nothing else from the package; models does not import data)
  rank 1  parallel
  rank 2  checkpoints
  rank 3  generation, training  (peers: neither imports the other)
  rank 4  testing
  rank 5  cli

A module may import its own sub-package and sub-packages of a lower rank. The top-level modules other than
``__init__`` are re-export shims for old import paths: they stand outside the layers, stay small, import only
from sub-packages, and nothing in the package imports them (nor the package root).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vipllava_jax

PKG_DIR = Path(vipllava_jax.__file__).resolve().parent
ROOT = "vipllava_jax"
RANK = {"models": 0, "data": 0, "parallel": 1, "checkpoints": 2, "generation": 3, "training": 3, "testing": 4,
        "cli": 5}
# Imported inside functions on purpose: optional (torch, huggingface_hub: hub downloads) or heavy to import and
# needed on one path only (transformers, tokenizers: a checkpoint's tokenizer, the tiny test processor).
LAZY_OK = {"torch", "transformers", "tokenizers", "huggingface_hub"}
SHIM_MAX_LINES = 40


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
           if lazy and dst.split(".")[0] not in LAZY_OK]
    assert not bad, ("imports inside functions (allowed only for " + ", ".join(sorted(LAZY_OK)) + "):\n  "
                     + "\n  ".join(bad))


@pytest.mark.parametrize("name", sorted(m for m in MODULES if layer(m) == "shim"))
def test_shims_are_small_and_point_into_the_subpackages(name):
    lines = MODULES[name].read_text().splitlines()
    assert len(lines) <= SHIM_MAX_LINES, f"{name} is a top-level module of {len(lines)} lines: code lives in the " \
                                         f"sub-packages, top-level modules only re-export"
    for dst, line, lazy in IMPORTS[name].found:
        if dst.split(".")[0] == ROOT:
            assert layer(dst) not in ("root", "shim"), f"{_where(name, line)}: a shim imports {dst}"
        else:
            assert dst == "sys", f"{_where(name, line)}: a shim imports {dst}; it only re-exports the package's names"


def test_old_import_paths_still_work():
    """Names the README and the issues use, from where they always were."""
    import importlib
    for mod, names in {
        "vipllava_jax": ["load_pretrained", "generate", "generate_stream", "generate_stream_tokens", "make_mesh",
                         "sharded_forward", "sharded_generate", "plan_memory", "PRESETS", "save_orbax",
                         "restore_orbax", "load_config", "load_hf_params", "save_hf"],
        "vipllava_jax.processing": ["Processor", "build_prompt", "load_image", "ImageConfig", "preprocess_image"],
        "vipllava_jax.convert": ["save_hf", "canonical_key", "flat_paths", "abstract_params"],
        "vipllava_jax.testing": ["make_tiny_checkpoint", "tiny_hf_config", "TINY_IMAGE_TOKEN"],
        "vipllava_jax.tiny_tokenizer": ["make_tiny_processor"],
        "vipllava_jax.distributed": ["initialize"],
        "vipllava_jax.sharding_rules": ["LOGICAL_AXIS_RULES", "MESH_AXES"],
        "vipllava_jax.sharding": ["make_mesh", "param_sharding_tree", "sharded_generate", "shard_params"],
        "vipllava_jax.checkpoint": ["load_pretrained", "resolve_model_path", "relayout"],
        "vipllava_jax.plan": ["PRESETS", "plan_memory"],
        "vipllava_jax.visual_prompts": ["draw_markers", "Rectangle", "build_question", "_triangle_points"],
    }.items():
        m = importlib.import_module(mod)
        missing = [n for n in names if not hasattr(m, n)]
        assert not missing, f"{mod} lacks {missing}"
