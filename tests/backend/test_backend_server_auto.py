"""``vllm serve`` with the default ``auto`` policy: calibrated at start-up, and the pages follow it."""
import re

import pytest

httpx = pytest.importorskip("httpx")  # the GPU machine has no vLLM server stack
from test_backend_server import Server  # noqa: E402

from vllm_int4kv.policy.layer_map import parse_policy_map  # noqa: E402

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
    # one layout for both layers, or a map (the tiny model's K4 layouts cost more than auto's target)
    line = (re.search(r"vllm-int4kv: KV policy (\S+), (\d+) bytes/token/layer.*from int4kv auto policy", logs)
            or re.search(r"vllm-int4kv: KV policy map (\S+): .*\((\d+) bytes/token/layer with 2 KV heads\)"
                         r".*from int4kv auto policy", logs))
    assert line, [row for row in logs.splitlines() if "vllm-int4kv" in row] or logs[-4000:]
    policy_map, per_layer = parse_policy_map(line.group(1)), int(line.group(2))
    mean = policy_map.mean_slot_bytes([0, 1], 64, elem_bytes=4)  # 2 KV heads, head_dim 64, fp32 model
    assert per_layer == round(2 * mean)
    # vLLM sized the cache with our pages: 2 layers x their bytes per token, to within one block.
    tokens = int(re.search(r"KV cache size: ([\d,]+) tokens", logs).group(1).replace(",", ""))
    assert tokens == pytest.approx(KV_SPACE_BYTES / (2 * 2 * mean), abs=128)
