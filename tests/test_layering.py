"""Imports run one way: between hpipe's modules and packages (cli on top, core types at the
bottom) the import graph, lazy imports inside functions included, has no cycle.  Inside one
package (planners, runtime, sim) a package's __init__ and its modules may import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import hpipe

ROOT = Path(hpipe.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    return bool(parts) and ((ROOT.joinpath(*parts).with_suffix(".py")).is_file()
                            or (ROOT.joinpath(*parts) / "__init__.py").is_file())


def _imports(path: Path) -> set[str]:
    """Every hpipe module ``path`` imports, at the top or inside a function."""
    here = _module(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            found.add(base)
            # `from hpipe import notes`: the module notes, where the name is one
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "hpipe" or m.startswith("hpipe.")}


def _group(module: str) -> str:
    """hpipe.costmodels.fitted -> hpipe.costmodels; hpipe.scenario -> hpipe.scenario."""
    return ".".join(module.split(".")[:2])


def module_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in ROOT.rglob("*.py"):
        for target in _imports(path):
            g.add_edge(_module(path), target)
    return g


def test_no_import_cycle_between_modules_and_packages():
    groups = nx.DiGraph()
    for a, b in module_graph().edges:
        if _group(a) != _group(b) and b != "hpipe":  # `import hpipe` for its __version__ only
            groups.add_edge(_group(a), _group(b))
    assert groups.number_of_edges() > 50  # the scan sees the imports at all
    cycles = list(nx.simple_cycles(groups))
    assert not cycles, f"import cycles between hpipe's parts: {sorted(cycles, key=len)[:5]}"


def test_cost_models_do_not_reach_up():
    """The cost models are built by the scenario and priced by the planners: neither they nor
    the scenario may import the runtime (torch), the planners or the simulator."""
    g = module_graph()
    low = [m for m in g if _group(m) in ("hpipe.costmodels", "hpipe.scenario", "hpipe.cluster")]
    up = ("hpipe.runtime", "hpipe.planners", "hpipe.sim", "hpipe.scenario", "hpipe.cli")
    for m in low:
        reached = {_group(t) for t in nx.descendants(g, m)}
        bad = reached & set(up) - {_group(m)}
        assert not bad, f"{m} imports (directly or through others) {sorted(bad)}"
