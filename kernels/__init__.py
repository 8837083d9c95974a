"""Triton kernels, their launchers and torch references for the quantized paged KV cache.

Nothing in this subpackage imports vLLM. It is installed as ``vllm_int4kv.kernels``. In a checkout,
this folder can also be found as a top-level ``kernels`` module whenever the checkout's root is on
``sys.path`` (``python -m ...`` run from it). A top-level ``import kernels`` means the PyPI package of
that name: transformers >= 5.25 depends on it and imports ``kernels.CUDAProperties``. So, imported
under that name while that package is installed, this folder loads the installed package in its place.
(Without it, it stays what it is: transformers then finds no version and does not use it.)
"""


def _installed_kernels_spec():
    """Where ``import kernels`` would lead if no copy of this folder were on ``sys.path`` (None: nowhere).

    Any copy counts: this checkout through any link, another clone or worktree (two copies handing over
    to each other would recurse). sys.path is searched one entry at a time, so a copy does not hide the
    entries after it; other finders on sys.meta_path (editable installs) are asked too.
    """
    import importlib.machinery
    import os
    import sys

    def wanted(spec) -> bool:  # a regular module or package (not a namespace folder) that is not ours
        return (spec is not None and bool(spec.origin)
                and not os.path.isfile(os.path.join(os.path.dirname(spec.origin), "page_format.py")))

    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            specs = (finder.find_spec("kernels", [entry]) for entry in sys.path)
        else:
            specs = [finder.find_spec("kernels", None)] if hasattr(finder, "find_spec") else []
        found = next((spec for spec in specs if wanted(spec)), None)
        if found is not None:
            return found
    return None


if __name__ == "kernels" and (_spec := _installed_kernels_spec()) is not None:
    import importlib.util as _util
    import sys as _sys

    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec._initializing = True  # another thread importing kernels meanwhile waits for the import lock
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        _sys.modules.pop("kernels", None)
        raise
    finally:
        _spec._initializing = False
else:
    from .page_format import PageLayout, slot_bytes

    __all__ = ["PageLayout", "slot_bytes"]
