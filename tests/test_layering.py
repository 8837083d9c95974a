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


# An editable install of the package `kernels` is found by a finder on sys.meta_path, not on sys.path.
EDITABLE_FINDER = """
import importlib.util, sys
class Editable:
    def find_spec(self, name, path=None, target=None):
        if name == "kernels":
            return importlib.util.spec_from_file_location(name, {init!r}, submodule_search_locations=[{folder!r}])
sys.meta_path.append(Editable())
"""


def _import_kernels_from_the_checkout(path_after_it: list[Path], editable: Path | None = None) -> list[str]:
    """``import kernels`` with the checkout's root first on sys.path (as ``python -m`` run from it)."""
    import subprocess
    import sys

    code = f"import sys; sys.path[:0] = {[str(ROOT)] + [str(p) for p in path_after_it]!r}\n"
    if editable:
        code += EDITABLE_FINDER.format(init=str(editable / "kernels" / "__init__.py"),
                                       folder=str(editable / "kernels"))
    code += "import kernels, vllm_int4kv.kernels as ours; print(kernels.__file__, ours.PageLayout.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def _kernels_installed_here() -> bool:
    from vllm_int4kv.kernels import _installed_kernels_spec

    return _installed_kernels_spec() is not None


def _an_installed_kernels_package(site: Path) -> Path:
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("from .sub import WHO\n")  # its own submodules load too
    (site / "kernels" / "sub.py").write_text("WHO = 'installed'\n")
    return site / "kernels" / "__init__.py"


DECOYS = ["none", "namespace folder", "second checkout"]


def _decoys(tmp_path: Path, which: str) -> list[Path]:
    """sys.path entries, between the checkout and the installed package, that must be passed over."""
    if which == "namespace folder":  # a `kernels/` folder with no __init__.py (it would import as empty)
        (tmp_path / "decoy" / "kernels").mkdir(parents=True)
    elif which == "second checkout":  # another clone: two copies must not hand over to each other
        import shutil

        shutil.copytree(ROOT / "kernels", tmp_path / "decoy" / "kernels")
    return [tmp_path / "decoy"] if which != "none" else []


@pytest.mark.parametrize("decoy", DECOYS)
@pytest.mark.parametrize("editable", [False, True], ids=["site-packages", "editable"])
def test_top_level_kernels_is_the_installed_package_when_there_is_one(tmp_path, editable, decoy):
    """transformers >= 5.25 installs the PyPI package ``kernels`` and imports ``kernels.CUDAProperties``;
    our checkout's ``kernels/`` folder must not stand in for it (it did: transformers failed to import)."""
    if editable and _kernels_installed_here():
        pytest.skip("a package named kernels is installed in this environment: it would be found first")
    installed = _an_installed_kernels_package(tmp_path / "site")
    path = _decoys(tmp_path, decoy) + ([] if editable else [tmp_path / "site"])
    found = _import_kernels_from_the_checkout(path, editable=tmp_path / "site" if editable else None)
    assert found == [str(installed), "PageLayout"]


@pytest.mark.parametrize("decoy", DECOYS)
def test_top_level_kernels_stays_the_checkout_folder_when_nothing_else_is_installed(tmp_path, decoy):
    """transformers 5.19 imports a ``kernels`` it finds without version metadata: that must not raise."""
    if _kernels_installed_here():
        pytest.skip("a package named kernels is installed in this environment")
    found = _import_kernels_from_the_checkout(_decoys(tmp_path, decoy))
    assert found == [str(ROOT / "kernels" / "__init__.py"), "PageLayout"]
