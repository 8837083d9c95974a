"""Preemption and recompute over quantized pages: a KV cache too small for the batch gives the same tokens.

vLLM preempts running requests when it runs out of blocks, frees their pages and later recomputes them
(prefill again). Recomputed pages must quantize to the same bytes, so greedy fp32 output is unchanged.
"""
import pytest
from conftest import vllm_engine

pytestmark = pytest.mark.engine  # starts vLLM engines: `pytest -m "not engine"` leaves it out

PROMPTS = [f"Licence clause {i}: the licensee may copy, modify and distribute the work, provided that"
           for i in range(8)]
MAX_TOKENS = 48


def generate(model, policy, **engine_kwargs):
    from vllm import SamplingParams

    with vllm_engine(model, policy=policy, disable_log_stats=False, max_model_len=128, block_size=16,
                     enable_prefix_caching=False, **engine_kwargs) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                            use_tqdm=False)
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        return [list(o.outputs[0].token_ids) for o in outs], preemptions


@pytest.mark.parametrize("policy", ["k16v16", "k4v4"])
def test_preempted_requests_recompute_to_the_same_tokens(tiny_model_dir, policy):
    ample, ample_preemptions = generate(tiny_model_dir, policy)
    # 8 requests grow to ~71 tokens (5 blocks of 16) each: 16 blocks cannot hold them all at once.
    tight, tight_preemptions = generate(tiny_model_dir, policy, num_gpu_blocks_override=16)
    assert ample_preemptions == 0
    assert tight_preemptions > 0, "the small cache should have forced preemption"
    assert tight == ample
