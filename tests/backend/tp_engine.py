"""Run one vLLM engine (CPU build) with our backend and print its greedy outputs as a JSON line.

Used by test_tensor_parallel.py in a fresh process per engine: tensor-parallel workers are spawned,
and each engine must see its own VLLM_INT4KV_POLICY. Usage: ``python tp_engine.py MODEL TP [PP]``;
``TP_ENGINE_KWARGS`` (JSON) adds engine arguments.

Pipeline parallel runs without ``enforce_eager``: on the CPU build of vLLM 0.32 an eager engine with
PP > 1 fails in vLLM's model runner (``intermediate_tensors`` is never allocated), with vLLM's own CPU
attention backend as with ours; the compiled path allocates them during warm-up.
"""
import json
import os
import sys

PROMPTS = [
    "The licensee may copy and distribute the software, provided that",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
    "and associated documentation files, to deal in the software without restriction, including",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND",
]


def main(model: str, tp: int, pp: int = 1) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model, dtype="float32", enforce_eager=pp == 1, seed=0, max_model_len=512,
              tensor_parallel_size=tp, pipeline_parallel_size=pp, attention_config={"backend": "CUSTOM"},
              **json.loads(os.environ.get("TP_ENGINE_KWARGS", "{}")))
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    result = []
    for out in outputs:
        completion = out.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        result.append({"tokens": list(completion.token_ids), "logprobs": logprobs})
    print("RESULT " + json.dumps({"outputs": result,
                                  "num_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
