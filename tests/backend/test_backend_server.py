"""``vllm serve`` with ``--attention-backend CUSTOM`` and K4V4 pages: the OpenAI API end to end.

The CPU build has no ``vllm`` console script, so the server starts as
``python -m vllm.entrypoints.openai.api_server`` (the same server ``vllm serve`` runs) on 127.0.0.1, in
its default multi-process mode (API server, engine core and worker each load the plugin).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.engine  # starts vLLM engines: `pytest -m "not engine"` leaves it out

httpx = pytest.importorskip("httpx")

MAX_TOKENS = 12
STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, log_path, policy="k4v4", **extra_env):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model)
        self.log_path = log_path
        env = dict(os.environ, VLLM_INT4KV_POLICY=policy, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                   **extra_env)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default process layout
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--attention-backend", "CUSTOM", "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "1024", "--max-num-seqs", "64", "--host", "127.0.0.1",
               "--port", str(self.port)]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self):
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready in {STARTUP_TIMEOUT_S} s:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self, timeout=90) -> int:
        """Ctrl-C, as a user would; the whole process group if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _completion(server, **body):
    body = dict(model=server.model, max_tokens=MAX_TOKENS, temperature=0.0, **body)
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_startup_log_states_policy_and_capacity(server):
    logs = server.logs()
    line = re.search(r"vllm-int4kv: KV policy k4v4, (\d+) bytes/token/layer.*?([\d.]+)x the tokens of a BF16", logs)
    assert line, logs[-4000:]
    assert int(line.group(1)) == 2 * 72  # 2 KV heads x 72 B (head_dim 64)
    assert float(line.group(2)) == pytest.approx(256 / 72, abs=0.01)
    # The capacity planner, given the same model folder, predicts exactly these numbers.
    from vllm_int4kv.planner.capacity import load_config, model_from_config, startup_summary

    model = model_from_config(load_config(server.model))
    planned = startup_summary(model.num_layers, model.num_kv_heads, model.head_dim, "k4v4")
    assert planned["bytes_per_token_per_layer"] == int(line.group(1))
    assert f"{planned['capacity_gain_vs_bf16']:.2f}" == line.group(2)


def test_completion_with_logprobs(server):
    reply = _completion(server, prompt="The licensee may copy and distribute", logprobs=2, ignore_eos=True)
    choice = reply["choices"][0]
    assert choice["text"] and reply["usage"]["completion_tokens"] == MAX_TOKENS
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == reply["usage"]["completion_tokens"]
    assert all(math.isfinite(x) and x <= 0 for x in logprobs["token_logprobs"])
    assert all(1 <= len(top) <= 3 for top in logprobs["top_logprobs"])


def test_chat_completion(server):
    body = dict(model=server.model, max_tokens=MAX_TOKENS, temperature=0.0,
                messages=[{"role": "user", "content": "Summarise the license in one line."}])
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)


def _sse_texts(lines):
    texts = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            texts.append(json.loads(line[6:])["choices"][0]["text"])
    return texts


def test_streaming_matches_the_non_streamed_answer(server):
    prompt = "Permission is hereby granted, free of charge,"
    body = dict(model=server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                ignore_eos=True)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    texts = _sse_texts(lines)
    assert len(texts) >= 2
    whole = _completion(server, prompt=prompt, ignore_eos=True)["choices"][0]["text"]
    assert "".join(texts) == whole


async def _many_requests(server, n=64, cancel_every=4):
    """n concurrent requests; every ``cancel_every``-th is a stream dropped after its first chunks."""
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        async def complete(i):
            body = dict(model=server.model, prompt=f"Section {i}. The licensor grants", max_tokens=MAX_TOKENS,
                        temperature=0.0, ignore_eos=True)
            reply = await client.post("/v1/completions", json=body)
            return reply.status_code, reply.json()["usage"]["completion_tokens"]

        async def stream_and_cancel(i):
            body = dict(model=server.model, prompt=f"Clause {i}: no warranty", max_tokens=200,
                        temperature=0.0, ignore_eos=True, stream=True)
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                chunks = 0
                async for line in reply.aiter_lines():
                    chunks += line.startswith("data: ")
                    if chunks >= 2:
                        break  # leaving the block closes the connection: the server must abort it
            return "cancelled", chunks

        jobs = [stream_and_cancel(i) if i % cancel_every == 0 else complete(i) for i in range(n)]
        return await asyncio.gather(*jobs)


def _running_requests(server) -> float:
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    values = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([\d.]+)", metrics, flags=re.M)
    return sum(float(v) for v in values)


def test_64_concurrent_requests_with_cancellations(server):
    results = asyncio.run(_many_requests(server))
    finished = [r for r in results if r[0] != "cancelled"]
    cancelled = [r for r in results if r[0] == "cancelled"]
    assert len(finished) == 48 and len(cancelled) == 16
    assert all(status == 200 and tokens == MAX_TOKENS for status, tokens in finished)
    deadline = time.time() + 60  # the dropped streams are aborted and their blocks freed
    while _running_requests(server) > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert _running_requests(server) == 0
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert _completion(server, prompt="Still alive?")["choices"][0]["text"] is not None


def _live_group_members(pgid: int) -> list[str]:
    """Processes of the server's group that still run (zombies awaiting a reaper do not count)."""
    ps = subprocess.run(["ps", "-o", "pid=,stat=,args=", "--sid", str(pgid)], capture_output=True, text=True)
    return [line for line in ps.stdout.splitlines() if line.split()[1:2] and not line.split()[1].startswith("Z")]


def test_clean_shutdown(server):
    # runs last in this module: Ctrl-C, then the server and its engine processes must be gone
    code = server.stop()
    tail = server.logs()[-5000:]
    assert code in (0, -signal.SIGINT), f"exit code {code}:\n{tail}"
    assert "Application shutdown complete" in tail, tail
    deadline = time.time() + 30
    while _live_group_members(server.proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _live_group_members(server.proc.pid), "engine processes outlived the server"
    # vLLM force-kills its engine processes on shutdown; what must never appear is our code failing
    assert "vllm_int4kv" not in "".join(tail.split("Traceback")[1:]), tail
