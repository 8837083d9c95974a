"""Quality of KV policies through vLLM: lm-eval tasks, perplexity, agreement and KL vs k16v16.

``vllm-int4kv quality MODEL --policies k16v16,k8v4,k4v4,auto --tasks T1,T2 --include-path DIR --out DIR``
(the options: ``vllm_int4kv.cli.quality``).

Each policy runs in its own process (``worker``: the policy is resolved once per process) on
the same prompts, prepared here once; this process then compares every run with the ``k16v16``
reference and writes ``report.md``, ``report.json`` and ``quality.png`` into ``--out``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .worker import SKIP_MARK, VLLM_PREFIX, split_run_name

REFERENCE = "k16v16"
PLOT_NAME = "quality.png"
HEARTBEAT_S = 60  # echo the worker's latest log line when it printed no progress line for this long


def say(message: str) -> None:
    print(f"[quality] {message}", flush=True)


# -- prompts: tokenized once, shared by every policy ----------------------------------------------
def build_prompts(args, out: Path) -> dict:
    """Token-id prompts for the workers; ``first_row`` = 1 (row i predicts token i)."""
    from transformers import AutoConfig, AutoTokenizer

    from . import long_context

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(Path(args.corpus).read_text(encoding="utf-8"), add_special_tokens=False,
                    verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id if args.bos == "auto" else None
    prefix = [] if bos is None else [bos]
    gen_lengths = args.gen_lengths
    need = args.ppl_chunks * args.chunk_tokens + args.long_prompts * args.long_tokens + sum(gen_lengths)
    if len(ids) < need:
        raise SystemExit(f"{args.corpus} has {len(ids)} tokens; these settings need {need}")
    cursor = 0

    def take(n: int) -> list[int]:
        nonlocal cursor
        cursor += n
        return prefix + ids[cursor - n:cursor]

    # Without a BOS the first token of a prompt has no context and is not scored (rows start at 1).
    prompts = {"ppl": [take(args.chunk_tokens) for _ in range(args.ppl_chunks)],
               "long": [take(args.long_tokens) for _ in range(args.long_prompts)],
               "gen": [take(n) for n in gen_lengths], "first_row": 1, "bos_token_id": bos,
               "corpus_tokens": len(ids)}
    limit = getattr(AutoConfig.from_pretrained(args.model).get_text_config(), "max_position_embeddings", None)
    lengths = [n for n in args.passkey_lengths if limit is None or n + long_context.ANSWER_TOKENS <= limit]
    prompts["passkey"] = long_context.passkey_prompts(tokenizer, lengths, seed=args.seed) if lengths else []
    prompts["passkey_skipped"] = [n for n in args.passkey_lengths if n not in lengths]
    prompts["genres"] = (long_context.genre_chunks(tokenizer, args.genres, args.genre_chunks, args.chunk_tokens,
                                                   prefix) if args.genres else {})
    (out / "prompts.json").write_text(json.dumps(prompts))
    return prompts


# -- one process per policy -------------------------------------------------------------------------
def worker_env(policy: str) -> dict:
    env = dict(os.environ, VLLM_INT4KV_POLICY=split_run_name(policy)[0], VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TOKENIZERS_PARALLELISM="false")
    if policy.startswith(VLLM_PREFIX):  # our backend stays unused; it must not try to resolve this name
        env.pop("VLLM_INT4KV_POLICY")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env


# Spec fields that decide the scored prompts and the engine: a run that matches them can be reused.
SAME_RUN_KEYS = ("model", "dtype", "seed", "top_k", "max_model_len", "prompts_sha256", "gen_tokens")


def reusable(run_dir: Path, spec: dict) -> dict | None:
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    old = result.get("spec", {})
    same = result.get("ok") and all(old.get(key) == spec[key] for key in SAME_RUN_KEYS)
    return result if same and (run_dir / "topk.npz").exists() else None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_policy(policy: str, spec: dict, out: Path, timeout: float, reuse: bool = False) -> dict:
    """Run the worker; stream its output to ``worker.log`` and echo its progress lines."""
    run_dir = out / "runs" / policy
    run_dir.mkdir(parents=True, exist_ok=True)
    earlier = reusable(run_dir, spec) if reuse else None
    if earlier is not None:
        say(f"{policy}: reusing the earlier run in {run_dir}")
        return earlier
    (run_dir / "result.json").unlink(missing_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps({**spec, "policy": policy, "run_dir": str(run_dir)}, indent=1))
    started = last_echo = time.monotonic()
    tail: list[str] = []
    with open(run_dir / "worker.log", "w") as log, subprocess.Popen(
            [sys.executable, "-m", "vllm_int4kv.quality.worker", str(spec_path)], env=worker_env(policy),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True) as proc:
        # A watchdog, not a check inside the loop: a worker that hangs silently prints nothing to wake
        # it. It kills the whole process group: an engine process left behind would keep the pipe open.
        watchdog = threading.Timer(timeout, _kill_group, args=(proc,))
        watchdog.start()
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            now = time.monotonic()
            if line.startswith("[quality"):
                print(line, end="", flush=True)
                last_echo = now
            elif now - last_echo > HEARTBEAT_S and line.strip():  # long stages: show where they are
                print(f"[quality {policy}] ... {now - started:.0f} s: {line.strip()[:110]}", flush=True)
                last_echo = now
        code = proc.wait()
        watchdog.cancel()
        if time.monotonic() - started >= timeout and code != 0:
            tail.append(f"killed after {timeout:.0f} s (--timeout)")
    if code == 0 and (run_dir / "result.json").exists():
        return json.loads((run_dir / "result.json").read_text())
    errors = [t for t in tail if "Error" in t or "error" in t or "killed" in t]
    error = (errors[-1] if errors else (tail[-1] if tail else f"exit code {code}")).strip()
    say(f"{policy} FAILED (exit {code}): {error}; log: {run_dir / 'worker.log'}")
    return {"policy": policy, "ok": False, "error": error, "exit_code": code, "log_tail": tail[-15:]}


# -- comparison with the reference ------------------------------------------------------------------
def vllm_cache_bytes(kv_cache_dtype: str, head_dim: int) -> int:
    """Bytes per token per KV head of a vLLM 0.32 cache (BF16 basis), as its Triton backend sizes pages:
    per-(token, head) modes add one fp32 scale each to K and V."""
    if kv_cache_dtype in ("auto", "bfloat16", "float16"):
        return 4 * head_dim
    if kv_cache_dtype in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        return 2 * head_dim
    if kv_cache_dtype in ("int8_per_token_head", "fp8_per_token_head"):
        return 2 * head_dim + 8
    if kv_cache_dtype == "int4_per_token_head":
        return head_dim + 8
    raise ValueError(f"{VLLM_PREFIX}{kv_cache_dtype}: no size known for this vLLM cache dtype; use one of "
                     "auto, fp8, fp8_e4m3, fp8_e5m2, int8_per_token_head, fp8_per_token_head, "
                     "int4_per_token_head")


def vllm_baseline_problem(kv_cache_dtype: str, head_dim: int | None, dtype: str) -> str | None:
    """Why vLLM's own attention cannot run a ``kv_cache_dtype`` cache on this machine, or None.

    On CPU, vLLM picks its attention code by instruction set (its ``_get_attn_isa``): an fp8 cache
    needs AVX-512 or AMX on x86. Asked of vLLM itself, so the answer follows the installed version.
    """
    try:
        from vllm.platforms import current_platform
        if not current_platform.is_cpu():
            return None
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:  # no vLLM, or a build without its CPU attention: the worker will say
        return None
    from ..policy.placement import DTYPES

    try:
        _get_attn_isa(DTYPES.get(dtype, DTYPES["bfloat16"]), 16, head_dim, kv_cache_dtype)
    except NotImplementedError as exc:
        return str(exc)
    return None


def _bytes_per_token(resolved: dict, model: str) -> float | None:
    """Bytes per token per KV head of what ran (BF16 basis for 16-bit planes), averaged over the attention
    layers at the layouts the worker saw them served with (a map, or layers kept unquantized)."""
    from transformers import AutoConfig

    from ..policy.layout import parse_policy

    config = AutoConfig.from_pretrained(model).get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    name = resolved["name"]
    if name.startswith(VLLM_PREFIX):
        return vllm_cache_bytes(name.removeprefix(VLLM_PREFIX), head_dim)
    sizes = [parse_policy(layout).slot_bytes(head_dim, 2) for layout in resolved["layer_layouts"].values()]
    mean = sum(sizes) / len(sizes)
    return int(mean) if mean.is_integer() else round(mean, 1)


def assemble(args, prompts: dict, runs: dict[str, dict], out: Path, machine: dict | None = None) -> dict:
    import numpy as np
    from transformers import AutoTokenizer

    from . import long_context
    from . import metrics as qm
    from .report import machine_info

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    n_ppl_rows = sum(len(p) - prompts["first_row"] for p in prompts["ppl"])
    ppl_rows = np.arange(n_ppl_rows)
    ref_ok = runs.get(REFERENCE, {}).get("ok")
    ref = qm.TopK.load(out / "runs" / REFERENCE / "topk.npz") if ref_ok else None
    policies = {}
    for name, run in runs.items():
        entry = {key: run[key] for key in ("ok", "error", "resolved", "seconds", "exit_code", "log_tail")
                 if key in run}
        if run.get("ok"):
            topk = qm.TopK.load(out / "runs" / name / "topk.npz")
            entry["perplexity"] = qm.perplexity(topk.target[ppl_rows])
            entry["bytes_per_token"] = _bytes_per_token(run["resolved"], args.model)
            entry["genre_perplexity"] = run.get("genre_perplexity", {})
            if prompts["passkey"]:
                entry["passkey"] = long_context.passkey_accuracy(tokenizer, prompts["passkey"], run["passkey"])
            lm_eval = run.get("lm_eval", {})
            entry["lm_eval"] = {task: r["metrics"] for task, r in lm_eval.items()}
            entry["lm_eval_samples"] = {task: r["n_samples"] for task, r in lm_eval.items()}
            if ref is not None:
                entry["vs_reference"] = qm.compare_logprobs(ref, topk, args.kl_top_k, ppl_rows)
                entry["generation"] = qm.generation_agreement(runs[REFERENCE]["generations"],
                                                              run["generations"])
                ref_choices = runs[REFERENCE].get("lm_eval", {})
                ref_genres = runs[REFERENCE].get("genre_perplexity", {})
                entry["genre_ppl_change"] = {genre: ppl / ref_genres[genre] - 1
                                             for genre, ppl in entry["genre_perplexity"].items() if genre in ref_genres}
                ref_chunks = runs[REFERENCE].get("genre_chunk_nll", {})
                entry["genre_ppl_change_se"] = {
                    genre: qm.change_standard_error(ref_chunks[genre], chunks)
                    for genre, chunks in run.get("genre_chunk_nll", {}).items() if genre in ref_chunks}
                entry["choice_agreement"] = {
                    task: qm.choice_agreement({int(d): c for d, c in ref_choices[task]["choices"].items()},
                                              {int(d): c for d, c in r["choices"].items()})
                    for task, r in lm_eval.items() if task in ref_choices}
        policies[name] = entry
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r.get("lm_eval", {})))
    limits = sorted({r["spec"]["limit"] for r in runs.values() if r.get("lm_eval")}, key=str)
    settings = {
        "tasks": tasks, "limit": limits[0] if len(limits) == 1 else limits, "dtype": args.dtype,
        "corpus_name": Path(args.corpus).name, "chunk_tokens": args.chunk_tokens,
        "ppl_chunks": args.ppl_chunks, "ppl_tokens": n_ppl_rows, "long_prompts": args.long_prompts,
        "long_tokens": args.long_tokens, "kl_rows": int(n_ppl_rows + sum(len(p) - 1 for p in prompts["long"])),
        "gen_prompts": len(prompts["gen"]), "gen_lengths": [len(p) for p in prompts["gen"]],
        "gen_tokens": args.gen_tokens, "top_k": args.top_k, "kl_top_k": args.kl_top_k,
        "bos_token_id": prompts["bos_token_id"], "seed": args.seed,
        "passkey_lengths": sorted({item["length"] for item in prompts["passkey"]}),
        "passkey_depths": sorted({item["depth"] for item in prompts["passkey"]}),
        "passkey_skipped": prompts["passkey_skipped"],
        "genres": {genre: len(chunks) for genre, chunks in prompts["genres"].items()},
        "genres_folder": str(args.genres) if args.genres else None,
    }
    return {"model": str(args.model), "model_name": Path(args.model).name, "reference": REFERENCE,
            "machine": machine or machine_info(), "settings": settings, "policies": policies, "plot": PLOT_NAME}


def worker_spec(args, out: Path, prompts: dict) -> dict:
    from .long_context import ANSWER_TOKENS

    longest = max([len(p) + args.gen_tokens for p in prompts["ppl"] + prompts["long"] + prompts["gen"]]
                  + [len(item["ids"]) + ANSWER_TOKENS for item in prompts["passkey"]])
    digest = hashlib.sha256((out / "prompts.json").read_bytes()).hexdigest()
    return {"model": str(args.model), "dtype": args.dtype, "seed": args.seed, "top_k": args.top_k,
            "prompts_sha256": digest,
            "max_model_len": max(2048, -(-longest // 256) * 256), "prompts": str(out / "prompts.json"),
            "gen_tokens": args.gen_tokens, "tasks": [t for t in args.tasks.split(",") if t],
            "include_path": args.include_path, "bootstrap_iters": 1000,
            "limit": (int(args.limit) if args.limit and args.limit >= 1 else args.limit)}


def model_shape(model: str) -> tuple[int | None, int | None]:
    """(head_dim, number of layers) from the model's config; (None, None) when it cannot be read, which
    is then left to vLLM's engine to report."""
    from ..policy.session import head_dim_of

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    except Exception:  # noqa: BLE001 - vLLM's engine names a model it cannot load
        return None, None
    return head_dim_of(config), getattr(config.get_text_config(), "num_hidden_layers", None)


def run_names(text: str | list[str]) -> list[str]:
    """``--policies`` as run names: comma-separated, except the commas of a map's layer lists (a comma
    followed by a digit: ``k16v16,k4v4-rot;0-2,8:k8v4``); a JSON map file runs under its map's text."""
    from ..policy.layer_map import parse_policy_map, split_policy_list

    parts = [part for item in ([text] if isinstance(text, str) else text) for part in split_policy_list(item)]
    names = []
    for part in parts:
        try:
            names.append(parse_policy_map(part).name if part.lower().endswith(".json") else part)
        except ValueError as exc:
            raise SystemExit(f"--policies: {exc}") from exc
    return names


def check_policies(model: str, policies: list[str], dtype: str = "float32") -> None:
    """Fail before any engine starts on a name no worker could run, or a policy this model cannot take:
    key groups its head size does not allow, kept layers it does not have, or a ``vllm:`` baseline that
    vLLM cannot run on this machine (e.g. ``vllm:fp8`` on a CPU without AVX-512 or AMX)."""
    from ..policy.layer_map import parse_policy_map
    from ..policy.layout import is_layer_index

    head_dim, num_layers = model_shape(model)
    for name in policies:
        policy, skipped = split_run_name(name)
        try:
            if policy.startswith(VLLM_PREFIX):
                if skipped:
                    raise ValueError(f"{name}: {SKIP_MARK} applies to this backend's policies only")
                vllm_cache_bytes(policy.removeprefix(VLLM_PREFIX), 64)
                problem = vllm_baseline_problem(policy.removeprefix(VLLM_PREFIX), head_dim, dtype)
                if problem:
                    raise ValueError(f"{name} is not available on this machine: vLLM's own attention "
                                     f"refuses it here ({problem}). Drop it from --policies, or run it "
                                     "on a machine that has what vLLM asks for")
            elif policy != "auto":
                parsed = parse_policy_map(policy)
                if head_dim is not None:
                    parsed.check_head_dim(head_dim)
                if num_layers is not None:  # the engine checks the layers it built; the config's count here
                    parsed.check_layers(range(num_layers))
                if skipped and parsed.single is None:
                    raise ValueError(f"{name}: {SKIP_MARK} applies to uniform policies; write the layers "
                                     "to keep into the map (e.g. k4v4;0,1:k16v16)")
            if SKIP_MARK in name and not (skipped and all(map(is_layer_index, skipped))):
                raise ValueError(f"{name}: write the layers to keep unquantized as indices, e.g. "
                                 f"{policy}{SKIP_MARK}0:1")
            if skipped and policy != "auto" and not parse_policy_map(policy).quantized:
                raise ValueError(f"{name}: keeping layers unquantized needs a quantized policy")
            if num_layers is not None and any(int(i) >= num_layers for i in skipped):
                raise ValueError(f"{name}: the model's layers are 0 to {num_layers - 1}")
        except ValueError as exc:
            raise SystemExit(f"--policies: {exc}") from exc


def run(args) -> int:
    from . import report as quality_report

    if args.kl_top_k > args.top_k:
        raise SystemExit("--kl-top-k must not exceed --top-k")
    if args.ppl_chunks + args.long_prompts < 1:
        raise SystemExit("--ppl-chunks and --long-prompts are both 0: nothing would be scored; give one of "
                         "them at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policies = [REFERENCE] + [p for p in run_names(args.policies) if p.lower() != REFERENCE]
    check_policies(args.model, policies, args.dtype)
    prompts = build_prompts(args, out)
    spec = worker_spec(args, out, prompts)
    machine = quality_report.machine_info()  # the code as the runs start (a commit made during them is not theirs)
    say(f"{args.model}: {len(policies)} policies ({', '.join(policies)}), one engine process each; "
        f"logs in {out / 'runs'}")
    runs = {}
    for i, policy in enumerate(policies, 1):
        t0 = time.monotonic()
        say(f"policy {i}/{len(policies)}: {policy}")
        runs[policy] = run_policy(policy, spec, out, args.timeout, args.reuse)
        say(f"policy {policy}: {'ok' if runs[policy].get('ok') else 'failed'} in {time.monotonic() - t0:.0f} s")
    report = assemble(args, prompts, runs, out, machine)
    notes = Path(args.notes).read_text() if args.notes else None
    quality_report.write(report, out, notes)
    say(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / PLOT_NAME}")
    print(quality_report.table(report), flush=True)
    return 0 if all(r.get("ok") for r in runs.values()) else 1
