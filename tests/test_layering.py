"""The layers stay one-way: kernels know nothing of vLLM or the package; only backend.py imports vLLM.

Imports inside functions are allowed (the plugin and the quality worker start vLLM engines on purpose);
module-level imports are what would drag vLLM into every user of a lower layer.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_level_imports(path: Path) -> set[str]:
    """Top-level module names imported at module level (relative imports as '.name')."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_neither_vllm_nor_the_package(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # anywhere in the file, not only at module level
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in ("vllm", "vllm_int4kv")]
        elif isinstance(node, ast.ImportFrom):
            bad = [node.module] if node.level == 0 and (node.module or "").split(".")[0] in (
                "vllm", "vllm_int4kv") else []
            bad += [node.module] if node.level > 1 else []  # reaching out of the kernels package
        else:
            continue
        assert not bad, f"{path.name}:{node.lineno} imports {bad}: kernels must stay vLLM-free"


@pytest.mark.parametrize("path", sorted((ROOT / "vllm_int4kv").glob("*.py")), ids=lambda p: p.name)
def test_only_the_backend_imports_vllm_at_module_level(path):
    if path.name == "backend.py":
        return
    assert "vllm" not in module_level_imports(path), f"{path.name} imports vllm at module level"
