"""The package's layers: a lower layer (privacy, model) never imports a higher one (train, scaling,
commands), and no two parts of the package import each other, at module level or inside a function."""
import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dptrain"
LAYERS = [
    {"errors", "progress", "configio", "model", "generate", "checkpoint"},
    {"privacy"},
    {"data", "dp", "export"},
    {"distributed"},
    {"train"},
    {"audit", "scaling"},
    {"commands", "cli", "__main__"},
]
LAYER = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """dptrain.privacy.mechanism -> privacy; dptrain.model -> model."""
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """Every part of the package -> the parts it imports."""
    edges = defaultdict(set)
    for file in PACKAGE.rglob("*.py"):
        rel = file.relative_to(PACKAGE.parent).with_suffix("")
        if rel.name == "__init__" and len(rel.parts) == 2:
            continue  # the package's own __init__
        source = part_of(".".join(rel.parts))
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "dptrain":  # `from dptrain import configio`; __version__ is no part
                    targets = [alias.name for alias in node.names if not alias.name.startswith("__")]
                elif node.module.startswith("dptrain."):
                    targets = [part_of(node.module)]
                else:
                    continue
            elif isinstance(node, ast.Import):
                targets = [part_of(a.name) for a in node.names if a.name.startswith("dptrain.")]
            else:
                continue
            edges[source].update(t for t in targets if t != source)
    return edges


def test_every_part_has_a_layer():
    assert set(imports()) <= set(LAYER), set(imports()) - set(LAYER)


def test_no_part_imports_a_higher_layer():
    wrong = [(a, b) for a, targets in imports().items() for b in targets if LAYER[b] > LAYER[a]]
    assert not wrong, wrong


def test_no_two_parts_import_each_other():
    edges = imports()
    cycles = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets if a in edges.get(b, ())})
    assert not cycles, cycles
