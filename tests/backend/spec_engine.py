"""Run one vLLM engine (CPU build, in-process) with or without ngram speculative decoding and print its
greedy outputs and the accepted draft tokens as a JSON line.

Used by test_backend_paths.py in a fresh process per engine: on the CPU build, vLLM's ngram proposer
imports numba, and the CPU platform then rescans every loaded module for Triton kernels to override; a
module that pytest's process has loaded (pandas' numba helpers) holds an llvmlite object that breaks
that scan. Usage: ``python spec_engine.py MODEL BACKEND|none SPECULATE(0|1)`` with
VLLM_INT4KV_POLICY/VLLM_INT4KV_IMPL in the environment.
"""
import json
import sys


def main(model: str, backend: str, speculate: bool) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options = {"attention_config": {"backend": backend}} if backend != "none" else {}
    if speculate:
        options["speculative_config"] = {"method": "ngram", "num_speculative_tokens": 3,
                                         "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    llm = LLM(model, dtype="float32", enforce_eager=True, seed=0, max_model_len=512, block_size=32,
              disable_log_stats=False, **options)
    prompts = [TokensPrompt(prompt_token_ids=[10, 11, 12, 13] * 12),  # repeats: the drafts get accepted
               TokensPrompt(prompt_token_ids=list(range(30, 70)))]
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1, ignore_eos=True)
    outputs = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        outputs.append({"tokens": list(completion.token_ids), "logprobs": logprobs})
    accepted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    print("RESULT " + json.dumps({"outputs": outputs, "accepted": accepted}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
