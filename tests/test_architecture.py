"""docs/ARCHITECTURE.md is true: every owner it names exists, the workarounds happen only where
its table says, and the trainer imports only the runtime packages it lists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "megatron_ct"
DOC = (REPO / "docs" / "ARCHITECTURE.md").read_text()


def table(heading: str) -> list[list[str]]:
    """Rows (cells) of the first markdown table after ``## heading``."""
    section = DOC.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def modules() -> dict[str, ast.Module]:
    """'parallel/device.py' -> its syntax tree, for every module of the package."""
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


# --- the owner table ------------------------------------------------------------------------------


@pytest.mark.parametrize("row", table("Who owns what"), ids=lambda r: r[0])
def test_every_owner_exists(row):
    owners = re.findall(r"`([\w/]+\.py):([\w.]+)`", row[1])
    assert owners, f"{row[0]!r}: name the owner as `path.py:Symbol`"
    for path, symbol in owners:
        module = importlib.import_module("megatron_ct." + path.removesuffix(".py").replace("/", "."))
        obj = module
        for part in symbol.split("."):
            assert hasattr(obj, part), f"{row[0]!r}: megatron_ct/{path} has no {symbol}"
            obj = getattr(obj, part)


# --- where the workarounds live -----------------------------------------------------------------


def _megatron_names(tree: ast.Module) -> set[str]:
    """Names a module binds to megatron-core modules or objects by importing them."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("megatron.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _assigned(tree: ast.Module):
    """(target, node) of every attribute assignment and setattr() call."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Attribute):
                    yield target.value, target.attr, node
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            attr = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else "?"
            yield node.args[0], attr, node


def patches_torch_cuda(tree: ast.Module) -> list[int]:
    return [n.lineno for obj, _, n in _assigned(tree) if ast.unparse(obj).startswith("torch.cuda")]


def patches_megatron_core(tree: ast.Module) -> list[int]:
    """Assigning to a megatron-core module, swapping an object's class, or setting a private
    attribute of an object that is not ``self`` (megatron-core's internals)."""
    megatron = _megatron_names(tree)
    lines = []
    for obj, attr, node in _assigned(tree):
        root = _root(obj)
        if root in megatron or attr == "__class__" or (attr.startswith("_") and root not in ("self", "cls")):
            lines.append(node.lineno)
    return lines


def wraps_torch_distributed(tree: ast.Module) -> list[int]:
    """Assigning to ``torch.distributed`` (or a name bound to it) or setattr() on it."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return [n.lineno for obj, _, n in _assigned(tree) if ast.unparse(obj) in names]


def reads_megatron_version(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        text = ast.unparse(node) if isinstance(node, (ast.Attribute, ast.Call)) else ""
        if text.startswith("megatron") and text.endswith("__version__"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and text.startswith("getattr(megatron") and "'__version__'" in text:
            lines.append(node.lineno)
    return lines


def imports_dist_checkpointing(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            full = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(m.startswith("megatron.core.dist_checkpointing") for m in full):
                lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(
            a.name.startswith("megatron.core.dist_checkpointing") for a in node.names
        ):
            lines.append(node.lineno)
    return lines


DETECTORS = {
    "patch `torch.cuda`": patches_torch_cuda,
    "patch a megatron-core module or object": patches_megatron_core,
    "wrap `torch.distributed` functions": wraps_torch_distributed,
    "read megatron-core's version": reads_megatron_version,
    "import `megatron.core.dist_checkpointing`": imports_dist_checkpointing,
}


@pytest.mark.parametrize("row", table("Where the workarounds live"), ids=lambda r: r[0])
def test_workarounds_only_where_the_table_says(row):
    what, where = row
    assert what in DETECTORS, f"no check for {what!r}: add a detector to this test"
    allowed = set(re.findall(r"`([\w/]+\.py)`", where))
    found = {path: lines for path, tree in modules().items() if (lines := DETECTORS[what](tree))}
    outside = {path: lines for path, lines in found.items() if path not in allowed}
    assert not outside, f"{what}: outside {sorted(allowed)} at {outside}"
    assert set(found) == allowed, f"{what}: the table lists {sorted(allowed - set(found))}, which do not"


def test_the_detectors_catch_what_they_name():
    """Each detector fires on a one-line example (so an empty result means something)."""
    samples = {
        patches_torch_cuda: "import torch\ntorch.cuda.current_device = f\n",
        patches_megatron_core: "from megatron.core.models.common.embeddings import rope_utils\nrope_utils.f = g\n",
        wraps_torch_distributed: "import torch.distributed as dist\nsetattr(dist, op, f)\n",
        reads_megatron_version: "import megatron.core\nv = megatron.core.__version__\n",
        imports_dist_checkpointing: "from megatron.core import dist_checkpointing\n",
    }
    for detect, source in samples.items():
        assert detect(ast.parse(source)), detect.__name__
    assert patches_megatron_core(ast.parse("obj.__class__ = Sub\n"))
    assert not patches_megatron_core(ast.parse("self._cache = {}\n"))


# --- runtime and offline ------------------------------------------------------------------------


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(tree):  # function-level imports too: a lazy import still runs
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    resolved = set()
    for name in out:
        parts = name.split(".")
        resolved |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known}
    return resolved


def test_the_trainer_imports_only_the_runtime_packages():
    trees = {}
    for path, tree in modules().items():
        name = "megatron_ct." + path.removesuffix(".py").replace("/", ".")
        trees[name.removesuffix(".__init__")] = tree
    seen, todo = set(), ["megatron_ct.training.trainer"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports(trees[name], set(trees))
    runtime_text = DOC.split("## Runtime and offline\n", 1)[1].split("Offline tools", 1)[0]
    runtime = {d.rstrip("/") for d in re.findall(r"`(\w+)/`", runtime_text)}
    seen.discard("megatron_ct")
    packages = {n.split(".")[1] for n in seen}
    top_level = {p for p in packages if (PACKAGE / f"{p}.py").exists()}  # errors.py, jsonl.py, ...
    outside = sorted(packages - runtime - top_level)
    offline = sorted(n for n in seen if n.split(".")[1] in outside)
    assert not outside, f"the trainer imports offline packages {outside}: {offline}"
