"""Serve a tiny local model with INT4 KV pages and talk to it through the OpenAI-compatible API.

    python examples/demo.py [--model DIR] [--policy k4v4] [--port 8011]

Builds a tiny random Llama (seconds, no download) unless ``--model`` is given, starts
``python -m vllm.entrypoints.openai.api_server ... --attention-backend CUSTOM`` on 127.0.0.1 (what
``vllm serve`` runs; the CPU build of vLLM has no ``vllm`` command), sends one completion and one chat
request, prints the answers and the KV capacity gain, and shuts the server down. The tiny model's
weights are random, so its answers are fluent nonsense; the point is the plumbing and the capacity.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_server(model: str, port: int, policy: str, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, VLLM_INT4KV_POLICY=policy, HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; only read by vLLM's CPU build
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--attention-backend", "CUSTOM", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "1024", "--enforce-eager"]
    print("$", " ".join(cmd))
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"server not ready after {timeout_s:.0f} s; log: {log_path}")


def talk(url: str, model: str) -> None:
    import httpx

    completion = httpx.post(url + "/v1/completions", timeout=120, json=dict(
        model=model, prompt="The license grants you the right to", max_tokens=24, temperature=0.0)).json()
    print("\ncompletion:", repr(completion["choices"][0]["text"]))
    chat = httpx.post(url + "/v1/chat/completions", timeout=120, json=dict(
        model=model, max_tokens=24, temperature=0.0,
        messages=[{"role": "user", "content": "What does the license allow?"}])).json()
    print("chat:      ", repr(chat["choices"][0]["message"]["content"]))


def report_capacity(log: str) -> None:
    ours = re.search(r"vllm-int4kv: KV policy .*", log)
    tokens = re.search(r"KV cache size: ([\d,]+) tokens", log)
    print("\n" + (ours.group(0) if ours else "(no vllm-int4kv start-up line found in the server log)"))
    if not (ours and tokens):
        return
    n_tokens = int(tokens.group(1).replace(",", ""))
    slot, head_dim = map(int, re.search(r"x (\d+) B, head_dim (\d+)", ours.group(0)).groups())
    bf16_tokens = n_tokens * slot // (2 * head_dim * 2)  # the same bytes as unquantized BF16 K and V
    print(f"vLLM's block manager holds {n_tokens:,} tokens of KV cache in the configured memory; "
          f"a BF16 cache would hold {bf16_tokens:,} ({n_tokens / bf16_tokens:.2f}x more with these pages)")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does: the server drains and exits
    try:
        return proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: build the tiny random Llama)")
    parser.add_argument("--policy", default=os.environ.get("VLLM_INT4KV_POLICY", "k4v4"),
                        help="VLLM_INT4KV_POLICY for the server (default k4v4)")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="int4kv-demo-"))
    model = args.model
    if model is None:
        from vllm_int4kv.testing.tiny_model import build_tiny_llama

        model = str(build_tiny_llama(workdir / "tiny-llama", seed=0))
        print("built a tiny random Llama in", model)
    url = f"http://127.0.0.1:{args.port}"
    log_path = workdir / "server.log"
    proc = start_server(model, args.port, args.policy, log_path)
    try:
        wait_ready(proc, url, log_path)
        talk(url, model)
        report_capacity(log_path.read_text())
    finally:
        code = stop(proc)
    print(f"\nserver stopped (exit code {code}); full log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
