from setuptools import setup

# kernels/ is installed as the subpackage vllm_int4kv.kernels (a top-level `kernels` module would
# clash with the PyPI package of that name).
setup(
    name="vllm-int4kv",
    version="0.1.0",
    description="INT4 paged KV cache attention backend for vLLM (fused Triton kernels)",
    python_requires=">=3.10",
    packages=["vllm_int4kv", "vllm_int4kv.kernels"],
    package_dir={"vllm_int4kv": "vllm_int4kv", "vllm_int4kv.kernels": "kernels"},
    package_data={"vllm_int4kv": ["data/*"]},
    install_requires=["torch", "triton"],
    entry_points={
        "vllm.general_plugins": ["int4kv = vllm_int4kv.plugin:register"],
        "console_scripts": ["vllm-int4kv = vllm_int4kv.cli:main"],
    },
)
