"""The vLLM side: the attention backend vLLM loads for ``--attention-backend CUSTOM``, and the rules of
vLLM's own flags around it. The only package that imports vLLM at module level; everything it computes
it asks of ``vllm_int4kv.attention`` (the cache-write and attention steps) and ``vllm_int4kv.policy``."""
