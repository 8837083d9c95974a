"""The plugin against vLLM 0.32, 0.33 and 0.34: API conformance, run by ``vllm_api_probe.py`` inside an
environment holding each version's Python package (the suite's own environment for 0.32; for the others
``scripts/api_env.sh 0.33.0`` and ``scripts/api_env.sh 0.34.0``, which CI runs). Engine tests stay on the
CPU build of 0.32: the registry has no CPU build of 0.33 or 0.34, and 0.34's CPU engine needs triton-cpu.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("vllm_api_probe.py")
VERSIONS = {"0.32": sys.executable, "0.33": REPO / ".venv-vllm-0.33" / "bin" / "python",
            "0.34": REPO / ".venv-vllm-0.34" / "bin" / "python"}


def _probe(python, model) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_INT4KV_POLICY")}
    env.update(VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1")
    done = subprocess.run([str(python), str(PROBE), str(REPO), str(model)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version", list(VERSIONS))
def test_the_plugin_fits_the_api_of_each_supported_vllm(version, tiny_model_dir):
    python = VERSIONS[version]
    if not Path(python).exists():
        pytest.skip(f"no vLLM {version} environment: run scripts/api_env.sh {version}.0")
    found = _probe(python, tiny_model_dir)
    print(f"\nvLLM {found['vllm']}: {json.dumps(found)[:600]}")
    assert found["vllm"].startswith(version)
    assert found["custom_path"] == "vllm_int4kv.backend.attention_backend.Int4KVBackend"
    assert found["abstract"] == [] and found["signature_mismatches"] == {}
    own = version >= "0.33"  # our own --kv-cache-dtype name exists from 0.33
    assert found["int4kv_registered"] is own
    assert found["cache_dtypes"] == ["auto", "int4_per_token_head"] + (["int4kv"] if own else [])
    for dtype, config in found["configs"].items():  # each name parses into an engine config with our backend
        assert config == {"cache_dtype": dtype, "backend": "AttentionBackendEnum.CUSTOM"}, (dtype, config)
    # K4V4 at head size 64: 72 B per token and KV head, 2 KV heads
    assert found["pages"]["16"]["page_size_bytes"] == 16 * 2 * 72
    assert found["pages"]["64"]["page_size_bytes"] == 64 * 2 * 72
    assert found["default_block_size"] == (64 if version == "0.34" else 16)
