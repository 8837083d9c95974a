"""``vllm serve`` with the default ``auto`` policy: calibrated at start-up, and the pages follow it."""
import re

import pytest

httpx = pytest.importorskip("httpx")  # the GPU machine has no vLLM server stack
from test_backend_server import Server  # noqa: E402

from vllm_int4kv.policy import parse_policy  # noqa: E402

pytestmark = pytest.mark.engine  # starts vLLM engines: `pytest -m "not engine"` leaves it out

KV_SPACE_BYTES = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1 (GiB), set by Server


def test_auto_policy_picks_the_pages_at_start_up(tiny_model_dir, tmp_path):
    server = Server(tiny_model_dir, tmp_path / "server.log", policy="auto",
                    VLLM_INT4KV_CACHE_DIR=str(tmp_path / "decisions"))
    try:
        server.wait_ready()
        reply = httpx.post(server.url + "/v1/completions", timeout=120,
                           json=dict(model=server.model, prompt="The licensee may", max_tokens=4))
        assert reply.status_code == 200, reply.text
    finally:
        server.stop()
    logs = server.logs()
    line = re.search(r"vllm-int4kv: KV policy (\S+), (\d+) bytes/token/layer.*from int4kv auto policy", logs)
    assert line, logs[-4000:]
    policy, per_layer = parse_policy(line.group(1)), int(line.group(2))
    assert per_layer == 2 * policy.slot_bytes(64, elem_bytes=4)  # 2 KV heads, head_dim 64, fp32 model
    # vLLM sized the cache with our page: 2 layers x per_layer bytes per token, to within one block.
    tokens = int(re.search(r"KV cache size: ([\d,]+) tokens", logs).group(1).replace(",", ""))
    assert tokens == pytest.approx(KV_SPACE_BYTES / (2 * per_layer), abs=128)
