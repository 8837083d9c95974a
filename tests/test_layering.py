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


def _import_kernels_from_the_checkout(site: Path | None) -> str:
    """``import kernels`` with the checkout's root first on sys.path (as ``python -m`` run from it)."""
    import subprocess
    import sys

    path = [str(ROOT)] + ([str(site)] if site else [])
    code = (f"import sys; sys.path[:0] = {path!r}; import kernels, vllm_int4kv.kernels as ours; "
            "print(kernels.__file__, ours.PageLayout.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_top_level_kernels_is_the_installed_package_when_there_is_one(tmp_path):
    """transformers >= 5.25 installs the PyPI package ``kernels`` and imports ``kernels.CUDAProperties``;
    our checkout's ``kernels/`` folder must not stand in for it (it did: transformers failed to import)."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("from .sub import WHO\n")
    (tmp_path / "kernels" / "sub.py").write_text("WHO = 'installed'\n")
    assert _import_kernels_from_the_checkout(tmp_path) == [str(tmp_path / "kernels" / "__init__.py"), "PageLayout"]


def test_top_level_kernels_stays_the_checkout_folder_when_nothing_else_is_installed():
    """transformers 5.19 imports a ``kernels`` it finds without version metadata: that must not raise."""
    import importlib.machinery
    import sys

    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    if importlib.machinery.PathFinder.find_spec("kernels", elsewhere) is not None:
        pytest.skip("a package named kernels is installed in this environment")
    assert _import_kernels_from_the_checkout(None) == [str(ROOT / "kernels" / "__init__.py"), "PageLayout"]
