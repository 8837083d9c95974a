"""Triton kernels, their launchers and torch references for the quantized paged KV cache.

Nothing in this subpackage imports vLLM. It is installed as ``vllm_int4kv.kernels``. In a checkout,
this folder can also be found as a top-level ``kernels`` module whenever the checkout's root is on
``sys.path`` (``python -m ...`` run from it). A top-level ``import kernels`` means the PyPI package of
that name: transformers >= 5.25 depends on it and imports ``kernels.CUDAProperties``. So, imported
under that name while that package is installed, this folder loads the installed package in its place.
(Without it, it stays what it is: transformers then finds no version and does not use it.)
"""


def _installed_kernels_spec(checkout_kernels_init: str):
    """Where ``import kernels`` would lead if this checkout were not on ``sys.path`` (None: nowhere)."""
    import importlib.machinery
    import os
    import sys

    ours = os.path.realpath(checkout_kernels_init)
    checkout = os.path.dirname(os.path.dirname(ours))
    others = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != checkout]
    for finder in sys.meta_path:  # also editable installs, whose finders are not on sys.path
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec("kernels", others)
        else:
            spec = finder.find_spec("kernels", None) if hasattr(finder, "find_spec") else None
        if spec is not None and spec.origin and os.path.realpath(spec.origin) != ours:  # not a namespace
            return spec
    return None


if __name__ == "kernels" and (_spec := _installed_kernels_spec(__file__)) is not None:
    import importlib.util as _util
    import sys as _sys

    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del _sys.modules["kernels"]
        raise
else:
    from .page_format import PageLayout, slot_bytes

    __all__ = ["PageLayout", "slot_bytes"]
