"""Shared test set-up. Keep the environment block first: it must run before anything imports triton.

Without a GPU the Triton kernels run under the interpreter (exact for fp32/fp16, wrong for bf16
arithmetic, so CPU tests compute in fp32/fp16). Tests that need a GPU carry the ``gpu`` marker.
"""
import contextlib
import gc
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()

# VLLM_INT4KV_TEST_CPU=avx2 runs the suite as on an x86 CPU without AVX-512 or AMX, where vLLM's CPU
# attention refuses some caches (fp8): vLLM asks torch, so torch's answers are replaced here and, through
# cpu_isa/sitecustomize.py on PYTHONPATH, in every subprocess (engine and quality workers).
if os.environ.get("VLLM_INT4KV_TEST_CPU") == "avx2":
    _isa_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_isa")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_isa_dir, os.environ.get("PYTHONPATH")]))
    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
elif os.environ.get("VLLM_INT4KV_TEST_CPU"):
    raise RuntimeError("VLLM_INT4KV_TEST_CPU: only 'avx2' (emulate a CPU without AVX-512 and AMX) exists")


def without_avx512(monkeypatch) -> None:
    """Within one test, make vLLM see an x86 CPU without AVX-512 or AMX (this process only).

    vLLM's kernels are loaded first, for the real CPU, and not again while the patch holds: vLLM loads them
    from several modules, each time by the instruction set it sees, and its AVX2 build (vllm._C_AVX2),
    loaded into a process that already ran other tests, aborted it natively."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        monkeypatch.setattr(type(current_platform), "import_kernels", classmethod(lambda cls: None))
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run the suite on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


# -- shared by the backend tests (and anyone who needs a model) ------------------------------------
# vLLM's CPU build sizes the KV cache from this (GiB) instead of probing free memory.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (hidden 128, 2 layers, 4 q / 2 KV heads, head_dim 64) with its tokenizer."""
    from vllm_int4kv.testing.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_d128_dir(tmp_path_factory):
    """The same tiny Llama with head_dim 128 (where K4V4 is 136 B against BF16's 512 B per head)."""
    from vllm_int4kv.testing.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-d128"), seed=0, head_dim=128)


@contextlib.contextmanager
def env_vars(**values):
    """Set (or with None, unset) environment variables for the block; restore them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(saved)


def _set_env(values: dict) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def vllm_engine(model, *, backend: str | None = "CUSTOM", policy: str | None = "k16v16",
                impl: str | None = "torch", **engine_kwargs):
    """An in-process vLLM engine (fp32, eager, one process) with our backend or vLLM's own (None).

    ``policy``/``impl`` set ``VLLM_INT4KV_POLICY``/``VLLM_INT4KV_IMPL`` for this engine; the process's
    resolved policy is reset before and after, so engines with different policies can follow each other.
    """
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from vllm_int4kv.policy import current

    kwargs = dict(dtype="float32", enforce_eager=True, seed=0, max_model_len=2048)
    if backend:
        kwargs["attention_config"] = {"backend": backend}
    kwargs.update(engine_kwargs)
    with env_vars(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_INT4KV_POLICY=policy, VLLM_INT4KV_IMPL=impl):
        current.reset_policy()
        try:
            llm = LLM(str(model), **kwargs)
        except BaseException:
            # A start-up that fails midway (a refused configuration) leaves its process groups behind,
            # and the next engine would reuse them: e.g. without the expert-parallel group a MoE needs.
            cleanup_dist_env_and_memory()
            _forget_engine()
            raise
        try:
            yield llm
        finally:
            # Shut down now: a finalizer left for the garbage collector would tear down the
            # distributed state of whichever engine this process runs next.
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()
            _forget_engine()


def _forget_engine() -> None:
    """Drop what the plugin remembered of an engine that has shut down: its policy, and the config the
    backend keeps for calls made outside vLLM's config context (unit tests that run after this engine
    would otherwise see its --kv-cache-dtype-skip-layers)."""
    import sys

    from vllm_int4kv.policy import current

    current.reset_policy()
    engine = sys.modules.get("vllm_int4kv.backend.engine")
    if engine is not None:
        engine.forget_config()


def error_chain(e: BaseException | None) -> list[str]:
    """The messages of an error and of those it wraps (the engine wraps start-up errors in its own)."""
    chain = []
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    return chain


def num_kv_blocks(llm) -> int:
    """How many KV blocks vLLM's block manager got (the same memory budget for every engine)."""
    return llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
