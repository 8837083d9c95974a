"""vllm-int4kv: an INT4 paged KV cache for vLLM, read and written by fused Triton kernels."""
__version__ = "0.1.0"
