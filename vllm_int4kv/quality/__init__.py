"""``vllm-int4kv quality``: policies run through vLLM's engine (one worker process each) and compared
with the unquantized reference (``runner``, ``worker``, ``metrics``, ``report``)."""
