"""The house reads one way: no module imports from a layer above its own (docs: ../README.md "What is here").

Layers, lowest first: showo2 (the model) <- flashu (accelerations) <- jobs (the edge: spec, storage, ids, output
contract) <- workers (Ray actors) <- scheduler (Ray Data pipelines, the processor) <- app (CLI and what it runs).
bench and train stand beside the stack and may use any of it; nothing in the stack imports them.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["showo2", "flashu", "jobs", "workers", "scheduler", "app"]
BESIDE = ["bench", "train"]


def imported_packages(path: str) -> set[tuple[str, int]]:
    """(flashu_batch subpackage, line) for every import of one, at any depth in the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "flashu_batch" and len(parts) > 1:
                found.add((parts[1], node.lineno))
            assert parts[0] not in LAYERS + BESIDE, f"{path}:{node.lineno} imports {name!r}; use flashu_batch.{name}"
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_no_module_imports_from_a_layer_above(package):
    rank = LAYERS.index(package)
    folder = os.path.join(REPO, package)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        for imported, line in imported_packages(os.path.join(folder, name)):
            assert imported in LAYERS, f"{package}/{name}:{line} imports flashu_batch.{imported}, beside the stack"
            assert LAYERS.index(imported) <= rank, (f"{package}/{name}:{line} imports flashu_batch.{imported}, a "
                                                    f"layer above {package}")


def test_showo2_knows_nothing_of_ray_storage_or_flashu():
    for name in os.listdir(os.path.join(REPO, "showo2")):
        if name.endswith(".py"):
            source = open(os.path.join(REPO, "showo2", name), encoding="utf-8").read()
            for word in ("import ray", "import boto3", "from ray", "pyarrow.fs"):
                assert word not in source, f"showo2/{name} uses {word!r}"
