"""vLLM's own Triton kernels, staged from the installed vLLM and loaded without it (as on the GPU machine,
which has no vLLM), compute attention: run here under the Triton interpreter against plain attention."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import vllm_kernels  # noqa: E402

pytest.importorskip("vllm", reason="staging copies the kernels from an installed vLLM")


CURRENT = REPO / ".venv-vllm-0.34" / "bin" / "python"  # scripts/api_env.sh 0.34.0


@pytest.mark.parametrize("source", ["installed", "0.34"])
def test_staged_kernels_run_without_vllm(tmp_path, source):
    """From the installed vLLM (0.32 here), and from the current vLLM's package where its environment
    exists: staged for the GPU machine, they run without vLLM and compute attention."""
    if source == "installed":
        manifest = vllm_kernels.stage(tmp_path)
    elif not CURRENT.exists():
        pytest.skip("no vLLM 0.34 environment: run scripts/api_env.sh 0.34.0")
    else:
        subprocess.run([str(CURRENT), "benchmarks/vllm_kernels.py", "--stage", "--dir", str(tmp_path)], cwd=REPO,
                       check=True, capture_output=True, timeout=300)
        manifest = json.loads((tmp_path / vllm_kernels.MANIFEST).read_text())
        assert manifest["vllm_version"].startswith("0.34")
    assert manifest["kv_quant_mode"]["INT4_PER_TOKEN_HEAD"] == 4 and manifest["vllm_version"]
    script = textwrap.dedent("""
        import json, sys, torch
        sys.modules["vllm"] = None  # as on the GPU machine: `import vllm` fails
        from benchmarks import vllm_baseline
        status = vllm_baseline.availability(torch.device("cuda"))  # only the device type is read first
        cpu = torch.device("cpu")
        errors = {f"{m}/{n}": vllm_baseline.check(m, cpu, torch.float32, new_tokens=n)
                  for m in vllm_baseline.MODES for n in (1, 16)}  # decode (3D launch), chunked prefill
        emulated = {m: vllm_baseline.check(m, cpu, torch.float32, emulated=True)
                    for m in vllm_baseline.CHECK_MODES}
        codes = fp8_codes_vs_emulation()
        from benchmarks.config import SHAPES
        timed = [fn() for m in vllm_baseline.MODES  # what the harness times runs, here one call each
                 for fn in vllm_baseline.attention_fns(m, SHAPES["smollm2-135m"], 2, 8, 40, 1, cpu,
                                                       torch.float32)]
        timed += [fn() for fn in vllm_baseline.write_fns(SHAPES["smollm2-135m"], 5, 2, cpu, torch.float32)]
        print(json.dumps({"status": status, "source": vllm_baseline.SOURCE, "errors": errors,
                          "emulated": emulated, "fp8_codes": codes,
                          "staged": getattr(sys.modules["vllm"], "_int4kv_staged", False)}))
    """)
    script = textwrap.dedent(inspect.getsource(fp8_codes_vs_emulation)) + script
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
    # benchmarks/vllm_formats.py (the quality comparison with vLLM's formats) is vLLM's arithmetic: vLLM's
    # write and attention kernels agree with plain attention over the emulated K/V to fp32 rounding
    emulated = result["emulated"]
    assert set(emulated) == {"bf16", "fp8", "int4_per_token_head", "int8_per_token_head",
                             "fp8_per_token_head"}
    for mode, error in emulated.items():
        if mode != "fp8_per_token_head":  # see fp8_codes_vs_emulation
            assert error < 1e-5, (mode, error)
    codes = result["fp8_codes"]
    assert codes["scales_equal"] and codes["codes"] == 2 * 40 * 2 * 64
    assert codes["equal"] + codes["interpreter_quirk"] == codes["codes"]
    assert codes["equal"] > 0.9 * codes["codes"]


def fp8_codes_vs_emulation() -> dict:
    """vLLM's fp8_per_token_head write kernel against the emulation, code by code.

    Its scales must be equal. Its e4m3 codes are equal except where the Triton interpreter's fp32 -> e4m3
    cast goes wrong: rounding up to a power of two loses the exponent carry (124.3 -> 64 instead of 128),
    and subnormal results are flushed to 0. CPU interpreter bugs (a GPU converts in hardware), so those,
    and only those, may differ. The read side is the path int8_per_token_head takes (code x scale), checked
    end to end above.
    """
    import torch
    from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
        triton_reshape_and_cache_flash_per_token_head_quant as write)
    from vllm.v1.kv_cache_interface import KVQuantMode

    from benchmarks.vllm_formats import fp8_per_token_head_codes

    gen = torch.Generator().manual_seed(1)
    key, value = (torch.randn(40, 2, 64, generator=gen) * 3 for _ in range(2))
    caches = [torch.zeros(40, 1, 2, 64, dtype=torch.float8_e4m3fn) for _ in range(2)]
    scales = [torch.zeros(40, 1, 2) for _ in range(2)]
    write(key, value, *caches, *scales, torch.arange(40), KVQuantMode.FP8_PER_TOKEN_HEAD)
    report = {"scales_equal": True, "codes": 0, "equal": 0, "interpreter_quirk": 0}
    for x, cache, scale in zip((key, value), caches, scales):
        mine, mine_scale = fp8_per_token_head_codes(x)
        report["scales_equal"] &= torch.equal(mine_scale[..., 0], scale[:, 0])
        theirs = cache[:, 0].float()
        equal = mine == theirs
        power_of_two = torch.frexp(mine.abs())[0] == 0.5
        report["codes"] += mine.numel()
        report["equal"] += int(equal.sum())
        carry = (mine == 2 * theirs) & power_of_two
        flushed = (theirs == 0) & (mine.abs() < torch.finfo(torch.float8_e4m3fn).smallest_normal)
        report["interpreter_quirk"] += int((~equal & (carry | flushed)).sum())
    return report


def test_install_says_how_to_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="--stage"):
        vllm_kernels.install(tmp_path / "nothing")


def test_install_refuses_an_incomplete_stage(tmp_path):
    vllm_kernels.stage(tmp_path)
    (tmp_path / "vllm" / vllm_kernels.FILES[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="--stage` again"):
        vllm_kernels.install(tmp_path)
