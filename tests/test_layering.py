"""The package's layers, checked on its source: every import of every module under p2p_fedrot/
(absolute and relative, inside functions too) points to the same layer or a lower one, graph/ stays
free of torch, comm/ of LoRA, robust/ of processes and runs, and module-level imports form no cycle.
Pure parsing: nothing is imported.

Layers, lowest first (a module may import its own layer and those below):

    0 bottom   errors, io, seeding, packages, provenance, console, exact, config
    1 graph    communication graphs and mixing weights (numpy, scipy, networkx)
    2 comm     the process group and the neighbour exchange (flat tensors only)
    3 data     corpora and their partitions across peers
    4 peers    LoRA factors, the peer bank, optimizers, training, adapters
    5 methods  aggregation methods
    6 robust   attacks and robust mixing rules on gauge-fixed factors (pure maths)
    7 run      the round loop and what a run writes
    8 study    sweeps, run groups, findings, reports
    9 top      cli, __main__, the package itself, and old import paths kept for one release

config is bottom: the typed configuration is read by most layers (comm.runtime, data, peers, run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "p2p_fedrot"

LAYERS = ["bottom", "graph", "comm", "data", "peers", "methods", "robust", "run", "study", "top"]
RANK = {name: rank for rank, name in enumerate(LAYERS)}
SUBPACKAGES = {"graph", "comm", "data", "peers", "methods", "robust", "run", "study"}  # each a layer of its own
TOP_LEVEL = {  # modules directly under p2p_fedrot/
    "errors": "bottom", "io": "bottom", "seeding": "bottom", "packages": "bottom", "provenance": "bottom",
    "console": "bottom", "exact": "bottom", "config": "bottom",
    "cli": "top", "__main__": "top",
    "adapters": "top",  # p2p_fedrot.adapters: the old path of peers.adapters, kept for one release
}
# layer -> (external or internal module prefixes it must not import, why)
FORBIDDEN = {
    "bottom": [("torch.distributed", "the bottom layer does not talk to other processes")],
    "graph": [("torch", "graph/ is graph maths on numpy, scipy and networkx"),
              (f"{PACKAGE}.comm", "graph/ knows nothing of processes")],
    "comm": [("peft", "comm/ moves flat tensors and does not know LoRA"),
             *[(f"{PACKAGE}.{layer}", "comm/ moves flat tensors and does not know LoRA, data or runs")
               for layer in ("peers", "methods", "data", "run")]],
    "methods": [(f"{PACKAGE}.comm", "a method gets its inputs and reduces passed in; it never communicates"),
                (f"{PACKAGE}.run", "a method does not know the round loop")],
    "robust": [("torch.distributed", "robust rules and attacks are maths on the payloads they are given"),
               (f"{PACKAGE}.comm", "robust rules and attacks are maths on the payloads they are given"),
               (f"{PACKAGE}.run", "robust rules and attacks do not know the round loop")],
}
# (module, imported prefix): allowed exceptions to FORBIDDEN, each with its reason
ALLOWED = {
    (f"{PACKAGE}.console", "torch.distributed"): "reads the rank to print once; never communicates",
}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``root``/p2p_fedrot (a package by its __init__.py)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str | None:
    """The layer of a module of the package (None: not assigned, itself a failure)."""
    parts = module.split(".")
    if parts == [PACKAGE]:
        return "top"
    if parts[1] in SUBPACKAGES:
        return parts[1]
    return TOP_LEVEL.get(parts[1])


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at run time at import) for every import in ``path``. ``from X import a``
    names X.a when that is a module of the package, else X; relative imports are resolved."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), eager)
            elif isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, eager) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here[: len(here) - (child.level - 1)] if child.level > 1 else here
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                for alias in child.names:
                    sub = f"{source}.{alias.name}"
                    found.append((sub if sub in known else source, child.lineno, eager))
            else:
                visit(child, eager)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return list(dict.fromkeys(found))  # `from X import a, b` once, not once per name


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path = ROOT) -> list[str]:
    """One line per import that breaks the layering, naming the module, its line and the import."""
    files = module_files(root)
    known = set(files)
    problems = []
    for module, path in files.items():
        where = f"{module} ({path.relative_to(root)}"
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{where}) has no layer: add it to TOP_LEVEL in tests/test_layering.py")
            continue
        for target, line, _ in imports(module, path, known):
            at = f"{where}:{line}) imports {target}"
            for prefix, why in FORBIDDEN.get(layer, []):
                if under(target, prefix) and (module, prefix) not in ALLOWED:
                    problems.append(f"{at}: {why}")
            if not under(target, PACKAGE):
                continue
            target_layer = layer_of(target)
            if target_layer is None:
                problems.append(f"{at}, which has no layer")
            elif RANK[target_layer] > RANK[layer]:
                problems.append(f"{at}: {layer} (layer {RANK[layer]}) may not import {target_layer} "
                                f"(layer {RANK[target_layer]}), a higher layer")
    return problems


def cycles(root: Path = ROOT) -> list[list[str]]:
    """Cycles among the imports a module runs when it is imported (not those inside functions or
    under TYPE_CHECKING). A package's __init__ is left out as a target of its own submodules."""
    files = module_files(root)
    known = set(files)
    edges = {m: sorted({t for t, _, eager in imports(m, p, known) if eager and t in known and t != m
                        and not m.startswith(t + ".")})
             for m, p in files.items()}
    found, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            walk(module, [])
    return found


def test_every_import_points_to_the_same_layer_or_a_lower_one() -> None:
    problems = violations()
    assert problems == [], "imports that break the layering:\n" + "\n".join(problems)


def test_module_level_imports_form_no_cycle() -> None:
    found = cycles()
    assert found == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_module_has_a_layer() -> None:
    assert [m for m in module_files(ROOT) if layer_of(m) is None] == []


def test_the_check_catches_upward_imports_torch_in_graph_and_lora_in_comm(tmp_path: Path) -> None:
    files = {
        "__init__.py": "",
        "errors.py": "",
        "graph/__init__.py": "",
        "graph/weights.py": "import numpy\n\ndef f():\n    import torch\n",
        "comm/__init__.py": "",
        "comm/routes.py": "from peft import LoraConfig\nfrom ..graph import weights\n",
        "methods/__init__.py": "",
        "methods/base.py": "from ..errors import ConfigError\n\ndef g():\n    from ..run import loop\n",
        "robust/__init__.py": "",
        "robust/rules.py": "import torch.distributed\n",
        "run/__init__.py": "",
        "run/loop.py": "from p2p_fedrot.methods.base import g\nfrom ..study.report import r\n",
        "study/__init__.py": "",
        "study/report.py": "from . import groups\n",
        "study/groups.py": "from .report import r\n",
    }
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    problems = violations(tmp_path)
    assert problems == [
        "p2p_fedrot.comm.routes (p2p_fedrot/comm/routes.py:1) imports peft: comm/ moves flat tensors and does not "
        "know LoRA",
        "p2p_fedrot.graph.weights (p2p_fedrot/graph/weights.py:4) imports torch: graph/ is graph maths on numpy, "
        "scipy and networkx",
        "p2p_fedrot.methods.base (p2p_fedrot/methods/base.py:4) imports p2p_fedrot.run.loop: a method does not "
        "know the round loop",
        "p2p_fedrot.methods.base (p2p_fedrot/methods/base.py:4) imports p2p_fedrot.run.loop: methods (layer 5) may "
        "not import run (layer 7), a higher layer",
        "p2p_fedrot.robust.rules (p2p_fedrot/robust/rules.py:1) imports torch.distributed: robust rules and attacks "
        "are maths on the payloads they are given",
        "p2p_fedrot.run.loop (p2p_fedrot/run/loop.py:2) imports p2p_fedrot.study.report: run (layer 7) may not "
        "import study (layer 8), a higher layer",
    ]
    assert cycles(tmp_path) == [["p2p_fedrot.study.report", "p2p_fedrot.study.groups", "p2p_fedrot.study.report"]]
