"""vLLM's own Triton kernels, staged from the installed vLLM and loaded without it (as on the GPU machine,
which has no vLLM), compute attention: run here under the Triton interpreter against plain attention."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import vllm_kernels  # noqa: E402

pytest.importorskip("vllm", reason="staging copies the kernels from an installed vLLM")


def test_staged_kernels_run_without_vllm(tmp_path):
    manifest = vllm_kernels.stage(tmp_path)
    assert manifest["kv_quant_mode"]["INT4_PER_TOKEN_HEAD"] == 4 and manifest["vllm_version"]
    script = textwrap.dedent("""
        import json, sys, torch
        sys.modules["vllm"] = None  # as on the GPU machine: `import vllm` fails
        from benchmarks import vllm_baseline
        status = vllm_baseline.availability(torch.device("cuda"))  # only the device type is read first
        cpu = torch.device("cpu")
        errors = {f"{m}/{n}": vllm_baseline.check(m, cpu, torch.float32, new_tokens=n)
                  for m in vllm_baseline.MODES for n in (1, 16)}  # decode (3D launch), chunked prefill
        from benchmarks.config import SHAPES
        timed = [fn() for m in vllm_baseline.MODES  # what the harness times runs, here one call each
                 for fn in vllm_baseline.attention_fns(m, SHAPES["smollm2-135m"], 2, 8, 40, 1, cpu,
                                                       torch.float32)]
        timed += [fn() for fn in vllm_baseline.write_fns(SHAPES["smollm2-135m"], 5, 2, cpu, torch.float32)]
        print(json.dumps({"status": status, "source": vllm_baseline.SOURCE, "errors": errors,
                          "staged": getattr(sys.modules["vllm"], "_int4kv_staged", False)}))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "VLLM_INT4KV_VLLM_KERNELS": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] is None and result["staged"], result
    assert "staged" in result["source"]
    for n in (1, 16):
        errors = {mode: result["errors"][f"{mode}/{n}"] for mode in ("bf16", "fp8", "int4_per_token_head")}
        assert errors["bf16"] < 1e-5, n  # fp32 here: vLLM's kernel is exact
        assert 1e-3 < errors["fp8"] < 0.08, n  # e4m3 rounding of K and V, not garbage (~1)
        assert 1e-2 < errors["int4_per_token_head"] < 0.25, n


def test_install_says_how_to_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="--stage"):
        vllm_kernels.install(tmp_path / "nothing")
