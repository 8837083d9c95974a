"""CPU serving throughput: vLLM's own CPU attention against our torch path, on the CPU build of vLLM.

    python benchmarks/cpu_serving.py MODEL_DIR [--policies k4v4,k16v16] [--vllm-caches auto,fp8]
                                     [--requests 32] [--tokens 64] [--prompt-tokens N]

Each engine runs in its own process (in-process engine, eager, fp32), serves the same greedy requests
once to warm up, then ``--repeats`` timed times, and prints the median output tokens per second (the
2-core VM this was written on varies by +-15 % from run to run). Not a GPU benchmark: it shows
what the INT4 pages cost a CPU user, whose attention runs in ``kernels/torch_attention.py``.
``--prompt-tokens N`` gives every request an N-token prompt of its own (prefix caching off, so every
pass prefills them all): with ``--tokens 1`` it measures prefill. ``--vllm-caches`` lists the
``--kv-cache-dtype`` values vLLM's own CPU attention runs with (``auto``: the model dtype; ``fp8``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time


def serve(model: str, backend: str, requests: int, tokens: int, repeats: int, prompt_tokens: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if backend.startswith("native:"):  # vLLM's own CPU attention, with the cache dtype after the colon
        extra = {"kv_cache_dtype": backend.removeprefix("native:")}
    else:
        extra = {"attention_config": {"backend": "CUSTOM"}}
    llm = LLM(model, dtype="float32", enforce_eager=True, seed=0,
              max_model_len=max(1024, prompt_tokens + tokens), enable_prefix_caching=not prompt_tokens, **extra)
    prompts = [f"Write a short story about the number {i} and a lighthouse keeper." for i in range(requests)]
    if prompt_tokens:  # each entry is ~15 tokens: enough text for N tokens after the request's number
        encode = llm.get_tokenizer().encode
        text = " ".join(f"Entry {j}: the keeper counted {j * 7 % 101} ships and wrote them down." for j in
                        range(prompt_tokens // 8 + 1))
        prompts = [TokensPrompt(prompt_token_ids=encode(f"Request {i}. {text}")[:prompt_tokens])
                   for i in range(requests)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompted = sum(len(o.prompt_token_ids) for o in outputs)
    print(f"RESULT {produced} {prompted} {statistics.median(times):.3f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--policies", default="k4v4,k8v4,k16v16")
    ap.add_argument("--vllm-caches", default="auto", help="vLLM's own attention with these --kv-cache-dtype")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="N-token prompts (default: one sentence)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one engine in this process
    args = ap.parse_args()
    if args.worker:
        serve(args.model, args.worker, args.requests, args.tokens, args.repeats, args.prompt_tokens)
        return 0
    import torch
    import vllm

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; vllm {vllm.__version__}, "
          f"torch {torch.__version__}; {args.requests} requests x "
          f"{f'{args.prompt_tokens}-token prompts x ' if args.prompt_tokens else ''}{args.tokens} tokens, "
          f"fp32, greedy; median of {args.repeats} timed passes\n")
    print("| attention | KV cache | output tok/s | prompt tok/s | seconds |\n|---|---|---|---|---|")
    runs = [(f"native:{cache}", "vLLM CPU attention", "fp32 (vLLM)" if cache == "auto" else f"{cache} (vLLM)")
            for cache in args.vllm_caches.split(",")] + [
        ("custom", "vllm-int4kv torch path", policy) for policy in args.policies.split(",")]
    for backend, label, policy in runs:
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                   VLLM_INT4KV_POLICY=policy, VLLM_INT4KV_IMPL="torch")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        try:
            proc = subprocess.run([sys.executable, __file__, args.model, "--worker", backend,
                                   "--requests", str(args.requests), "--tokens", str(args.tokens),
                                   "--repeats", str(args.repeats),
                                   "--prompt-tokens", str(args.prompt_tokens)],
                                  env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            print(f"| {label} | {policy} | not measured: no result in 900 s | | |")
            continue
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"| {label} | {policy} | failed: {last} | | |")
            continue
        produced, prompted, seconds = int(line.split()[1]), int(line.split()[2]), float(line.split()[3])
        print(f"| {label} | {policy} | {produced / seconds:.1f} | {prompted / seconds:.0f} | {seconds:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
