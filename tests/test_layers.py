"""The layering rules of the code base (STYLE.md, "what that means here" 11), read from the
source: lower layers never import the passes, no pass file imports another pass file, and
the pictures read typed roles instead of decoding node names."""
import ast
from pathlib import Path

import pytest

from topo_compiler.passes import PASSES

ROOT = Path(__file__).resolve().parents[1]
LOWER_LAYERS = ("tracer", "meta", "descriptors", "ir", "lift", "analysis", "lower", "runtime")


def _imports(path: Path, package: str) -> set[str]:
    """Every module a file imports (also inside functions), relative imports resolved;
    ``from a import b`` counts as importing ``a`` and ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("module", LOWER_LAYERS)
def test_lower_layers_never_import_passes(module):
    imports = _imports(ROOT / "topo_compiler" / f"{module}.py", "topo_compiler")
    assert not {i for i in imports if i.split(".")[:2] == ["topo_compiler", "passes"]}


def test_no_pass_file_imports_another_pass_file():
    pass_modules = {cls.__module__ for cls in PASSES.values()}
    assert len(pass_modules) == len(PASSES)  # one pass per file
    for module in pass_modules:
        path = ROOT / "passes" / f"{module.rsplit('.', 1)[1]}.py"
        imports = _imports(path, "topo_compiler.passes")
        assert not imports & (pass_modules - {module}), module


def test_pictures_never_decode_node_names():
    """viz.py never asks what a node's name starts or ends with."""
    tree = ast.parse((ROOT / "topo_compiler" / "viz.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "endswith"):
            receiver = node.func.value
            assert not (isinstance(receiver, ast.Name) and receiver.id == "name"), node.lineno
            assert not (isinstance(receiver, ast.Attribute) and receiver.attr == "name"), \
                node.lineno
