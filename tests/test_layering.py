"""The layers stay one-way, as the tree shows them.

kernels/ (Triton, launchers, torch references) know nothing of vLLM or the package. Above them, each group
of ``vllm_int4kv`` imports only the groups listed in ``MAY_IMPORT``: ``policy`` (what precision) and
``attention`` (the vLLM-free cache-write and attention steps) sit on the kernels; ``backend`` (the only group
that imports vLLM at module level) on those; ``cli`` on everything, and nothing on ``cli``.

Imports inside functions count for the direction (a lower layer must not reach up even lazily); for vLLM
only module-level imports count (the plugin and the quality worker start vLLM engines on purpose).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_int4kv"

# group -> groups of vllm_int4kv it may import ("" is the package root: __version__)
MAY_IMPORT = {
    "envs": set(),
    "": set(),
    "kernels": set(),
    "testing": set(),
    "policy": {"", "envs", "kernels"},
    "attention": {"envs", "kernels", "policy"},
    "planner": {"kernels", "policy"},
    "quality": {"", "policy"},
    "backend": {"envs", "kernels", "policy", "attention"},
    "plugin": {"backend"},
    "cli": {"", "envs", "kernels", "policy", "attention", "planner", "quality", "testing"},
}


def group_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "" if parts == ("__init__",) else parts[0]


def package_imports(path: Path) -> set[str]:
    """The groups of vllm_int4kv a module imports, anywhere in it (relative imports resolved)."""
    here = path.relative_to(PACKAGE).parent.parts
    groups = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            target = list(here[:len(here) - node.level + 1]) + (node.module.split(".") if node.module else [])
        elif (node.module or "").split(".")[0] == "vllm_int4kv":
            target = node.module.split(".")[1:]
        else:
            continue
        if target:
            groups.add(target[0])
        else:  # from the package root: a module of it (``from .. import envs``) or an attribute of it
            groups.update(a.name if any(PACKAGE.glob(f"{a.name}*")) else "" for a in node.names)
    return groups


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


PACKAGE_MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "kernels" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", PACKAGE_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_groups_import_only_the_layers_below_them(path):
    group = group_of(path)
    assert group in MAY_IMPORT, f"{path.relative_to(PACKAGE)}: a new group; place it in MAY_IMPORT"
    reached = package_imports(path) - {group} - MAY_IMPORT[group]
    assert not reached, f"{path.relative_to(PACKAGE)} ({group or 'package root'}) imports {sorted(reached)}"


@pytest.mark.parametrize("path", PACKAGE_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_backend_imports_vllm_at_module_level(path):
    if group_of(path) == "backend":
        return
    assert "vllm" not in module_level_imports(path), f"{path.relative_to(PACKAGE)} imports vllm at module level"


def test_the_layering_rules_can_fail(tmp_path):
    """The import reader sees relative imports that reach up: a policy module importing the CLI."""
    fake = PACKAGE / "policy" / "_probe_for_layering_test.py"
    fake.write_text("def f():\n    from ..cli import main\n    from . import layout\n")
    try:
        assert package_imports(fake) == {"cli", "policy"}
    finally:
        fake.unlink()


def test_top_level_kernels_never_hides_an_installed_package_of_that_name(tmp_path):
    """transformers >= 5.25 imports the PyPI package ``kernels``. Our kernels/ folder has no __init__.py, so
    with the checkout's root first on sys.path (``python -m`` run from it) it is only a namespace folder,
    and a regular package of that name later on sys.path still wins; the subpackage imports as before."""
    import subprocess
    import sys

    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(site)!r}]\n"
            "import kernels, vllm_int4kv.kernels.page_format as ours; print(kernels.WHO, ours.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["installed", "vllm_int4kv.kernels.page_format"]
    assert not (ROOT / "kernels" / "__init__.py").exists()
