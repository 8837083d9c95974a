"""The benchmark harness: its smoke run (every path, tiny sizes, CPU interpreter), byte accounting checked
by hand, the import shim for the GPU machine. Times in the smoke run mean nothing; structure does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import traffic  # noqa: E402
from benchmarks.config import GRID_SHAPES, SHAPES, make_layout  # noqa: E402
from benchmarks.model_estimate import capacity  # noqa: E402
from benchmarks import vllm_kernels  # noqa: E402

try:
    import vllm  # noqa: F401
    HAVE_VLLM = True  # the smoke run stages its kernels and times them too
except ImportError:
    HAVE_VLLM = False
VLLM_CHECKS = {"vllm_bf16", "vllm_fp8", "vllm_int4_per_token_head"}

TOP_LEVEL = ("schema", "mode", "machine", "timing_meaningful", "dtype", "block_size", "copy_bandwidth_gbs",
             "copy", "gemm", "vllm", "decode", "sdpa_decode", "vllm_decode", "prefill", "sdpa_prefill", "vllm_prefill",
             "vllm_write",
             "write", "layer_step", "layer_step_map", "tune_splits", "tune_prefill", "checks", "skipped", "notes", "errors", "goals", "model_estimates",
             "plots", "elapsed_s")
ROW = ("median_us", "method", "bytes", "breakdown", "gbs", "pct_copy")
GOALS = ("decode_bandwidth", "long_context_speedup", "batch1_no_slowdown", "prefill_int4_vs_bf16",
         "cache_write_share")
MACHINE = ("gpu", "driver", "cuda", "torch", "triton", "sm_count")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    if HAVE_VLLM:  # vLLM's own kernels, staged as for the GPU machine, run as baselines too
        staged = tmp_path_factory.mktemp("vllm_kernels")
        vllm_kernels.stage(staged)
        env["VLLM_INT4KV_VLLM_KERNELS"] = str(staged)
    else:  # not the checkout's artifacts/vllm_kernels either, if setup_env.sh staged it there earlier
        env["VLLM_INT4KV_VLLM_KERNELS"] = str(tmp_path_factory.mktemp("no_vllm_kernels"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def _row(rows, **match):
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, len(found))
    return found[0]


def test_smoke_json_structure(smoke):
    _, r, stdout = smoke
    assert all(k in r for k in TOP_LEVEL), [k for k in TOP_LEVEL if k not in r]
    assert all(k in r["machine"] for k in MACHINE)
    assert r["mode"] == "smoke" and r["timing_meaningful"] is False and r["copy_bandwidth_gbs"] > 0
    if HAVE_VLLM:  # under the interpreter, on the smallest shape only
        assert r["vllm"]["status"] == "measured" and "staged" in r["vllm"]["source"]
        for table in ("vllm_decode", "vllm_prefill", "vllm_write"):
            assert r[table] and {row["shape"] for row in r[table]} == {"smollm2-135m"}, table
        assert {row["mode"] for row in r["vllm_prefill"]} == {"bf16", "fp8", "int4_per_token_head"}
        for table in ("decode", "prefill", "write"):
            assert any("speedup_vs_vllm_int4_per_token_head" in row for row in r[table]), table
    else:
        assert r["vllm"]["status"].startswith("not measured")
    assert not r["errors"]
    for table in ("decode", "sdpa_decode", "prefill", "sdpa_prefill", "write", "layer_step"):
        assert r[table], table
        for row in r[table]:
            assert all(k in row for k in ROW), (table, row)
            assert row["median_us"] > 0 and row["bytes"] == sum(row["breakdown"].values())
    for row in r["decode"]:
        assert "speedup_vs_k16v16" in row and "speedup_vs_sdpa" in row
    policies = {row["policy"] for row in r["decode"]}
    assert policies == {"k4v4", "k8v4", "k16v4", "k8v8", "k16v16", "k4v4-g32"}
    assert {row["shape"] for row in r["decode"]} == set(GRID_SHAPES)
    assert {row["kind"] for row in r["prefill"]} == {"prefill", "chunked_prefill"}
    steps = {row["policy"]: row for row in r["layer_step"]}
    assert set(steps) == {"k4v4", "k4v4-rot", "k4v4-g32", "k4v4-g32-rot", "k8v4", "k8v4-rot", "k16v16"}
    assert steps["k4v4"]["vs_plain"] == 1.0
    maps = {row["policy"]: row for row in r["layer_step_map"]}  # smollm2-135m: 30 layers
    assert set(maps) == {"k4v4-rot;0-1:k8v4-rot", "k4v4-rot;0-1,8:k16v16"}
    mixed = maps["k4v4-rot;0-1:k8v4-rot"]
    assert mixed["model_step_us"] == pytest.approx(28 * steps["k4v4-rot"]["median_us"] + 2 * steps["k8v4-rot"]["median_us"])
    assert mixed["uniform_model_step_us"]["k8v4-rot"] == pytest.approx(30 * steps["k8v4-rot"]["median_us"])
    assert all(row["vs_plain"] == row["median_us"] / steps[row["policy"].replace("-rot", "")]["median_us"]
               for row in r["layer_step"])
    assert r["tune_splits"] and all(row["best"] in (1, 2) for row in r["tune_splits"])
    assert all(set(row["warps_us"]) == {"2", "4", "8"} and row["best_warps"] in (2, 4, 8)
               for row in r["tune_splits"])
    assert all(set(row["stages_us"]) == {"default", "1"} for row in r["tune_splits"] + r["tune_prefill"])
    # on CPU only the per-warp route exists (the shared one needs inline PTX); on a GPU both are timed
    assert all(set(row["tiles_us"]) == {"launcher", "per-warp"} for row in r["tune_splits"] + r["tune_prefill"])
    assert {row["kind"] for row in r["tune_prefill"]} == {"prefill", "chunked_prefill"}
    assert {row["shape"] for row in r["tune_prefill"]} == {"smollm2-135m"}
    assert all(any(c["what"] == what and c["ok"] for c in r["checks"])
               for what in ("decode_warps", "decode_stages", "decode_tiles", "prefill_warps", "prefill_stages",
                            "prefill_tiles"))
    assert set(r["goals"]) == set(GOALS)
    assert all(g["status"] in ("met", "missed", "not measured") for g in r["goals"].values())
    assert r["model_estimates"] and "[" in stdout  # progress lines


def test_smoke_kernels_match_reference(smoke):
    _, r, _ = smoke
    whats = {c["what"] for c in r["checks"]}
    assert whats == {"decode", "decode_splits", "decode_warps", "decode_stages", "decode_tiles", "prefill",
                     "prefill_warps", "prefill_stages", "prefill_tiles", "write"} | (VLLM_CHECKS if HAVE_VLLM else set())
    bad = [c for c in r["checks"] if not c["ok"]]
    assert not bad
    assert max(c["error"] for c in r["checks"] if c["what"] not in VLLM_CHECKS) < 1e-2  # ours: exact-ish
    assert any(c["num_splits"] == 2 for c in r["checks"] if c["what"] == "decode_splits")


def test_smoke_outputs(smoke):
    out, r, _ = smoke
    md = (out / "summary.md").read_text()
    for needle in ("## Goals", "## Decode attention", "## Prefill", "## Cache write", "## Split-count",
                   "µs by stages (4 warps)", "µs by tile route",
                   "## Model-level estimate", "not measured", *GOALS):
        assert needle in md, needle
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib" in n for n in r["notes"])
    else:
        assert sorted(r["plots"]) == ["bandwidth.png", "speedup_vs_batch.png", "speedup_vs_context.png"]
        assert all((out / p).stat().st_size > 1000 for p in r["plots"])


def test_bytes_by_hand(smoke):
    """SmolLM2 (9 q / 3 kv heads, D 64), K4V4: a token row of one head is 32 B K + 32 B V + 8 B params."""
    _, r, _ = smoke
    row = _row(r["decode"], shape="smollm2-135m", policy="k4v4", batch=2, context=100)
    kv = 2 * 100 * 3 * (32 + 32 + 8)
    block_table = 2 * 7 * 4  # ceil(100 / 16) = 7 int32 entries per sequence
    q = out = 2 * 9 * 64 * 2  # fp16
    assert row["breakdown"]["k_plane"] == 2 * 100 * 3 * 32 and row["breakdown"]["params"] == 2 * 100 * 3 * 8
    assert row["bytes"] == kv + block_table + 2 * 2 * 4 + q + out == 47880
    row = _row(r["prefill"], shape="smollm2-135m", policy="k4v4", kind="chunked_prefill")
    assert row["bytes"] == 2 * 58 * 3 * 72 + 2 * 4 * 4 + 2 * (16 * 9 * 64 * 2)
    assert row["flops"] == 4 * 9 * 64 * 2 * (8 * 50 + 8 * 9 // 2)
    row = _row(r["write"], shape="smollm2-135m", policy="k4v4", tokens=3)
    assert row["bytes"] == 2 * 3 * 3 * 64 * 2 + 3 * 8 + 3 * 3 * 72


def test_split_partials_and_policies_bytes():
    shape = SHAPES["llama3-8b"]
    d = traffic.decode_bytes(shape, make_layout(shape, "k16v16"), 1, 1024, 8)
    assert d["breakdown"]["k_plane"] == d["breakdown"]["v_plane"] == 1024 * 8 * 256
    assert d["breakdown"]["params"] == 0 and d["partial_bytes"] == 2 * 32 * 8 * 130 * 4
    g32 = traffic.decode_bytes(shape, make_layout(shape, "k4v4-g32"), 1, 1024, 1)
    assert g32["breakdown"]["params"] == 1024 * 8 * (4 + 1) * 4  # 4 key groups + 1 value group, 4 B each


def test_prefill_block_q_mirrors_launcher(monkeypatch):
    """traffic.prefill_block_q must follow the launcher's BLOCK_Q (it sets which KV rows tiles re-read)."""
    from vllm_int4kv.kernels import attention

    seen = {}

    class Capture:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.update(kw)

    monkeypatch.setattr(attention, "paged_attention_kernel", Capture())
    for name, shape in SHAPES.items():
        layout = make_layout(shape, "k4v4")
        cache = torch.zeros(4, shape.num_kv_heads, layout.run_bytes, dtype=torch.uint8)
        for q_len in (1, 8):
            q = torch.zeros(q_len, shape.num_q_heads, shape.head_dim, dtype=torch.float16)
            attention.paged_attention(q, cache, layout, torch.zeros(1, 4, dtype=torch.int32),
                                      torch.tensor([32], dtype=torch.int32),
                                      torch.tensor([0, q_len], dtype=torch.int32),
                                      max_query_len=q_len, max_seq_len=32, num_splits=1)
            assert seen["BLOCK_Q"] == traffic.prefill_block_q(shape, q_len), (name, q_len)


def test_capacity_by_hand():
    cap = capacity(SHAPES["llama3-8b"], 8192, 40.0)
    assert cap["k4v4"] == 40 * 2 ** 30 // (32 * 8 * 136 * 8192) == 150
    assert cap["k16v16"] == 40


def test_gpu_session_imports_without_an_install(tmp_path):
    """The GPU machine has no install of this package: gpu_session.sh must import it from the checkout.

    Its dry run drops this environment's editable install (python -S), as on that machine; the kernels
    come through the checkout's link vllm_int4kv/kernels -> ../kernels."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "imports"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"kernels from {REPO / 'vllm_int4kv' / 'kernels' / 'attention.py'}" in proc.stdout


def _synthetic_gpu_results(k4v4_pct=90.0):
    """What a GPU run records, with times chosen so every goal has a known answer."""
    from benchmarks.config import PrefillPoint

    shape, copy_gbs = SHAPES["llama3-8b"], 3000.0
    r = {"copy_bandwidth_gbs": copy_gbs, "gemm": {"tflops": 700.0}, "timing_meaningful": True,
         "decode": [], "sdpa_decode": [], "vllm_decode": [], "prefill": [], "sdpa_prefill": [], "write": [],
         "vllm_prefill": [], "vllm_write": [], "layer_step": [], "tune_splits": [], "checks": [], "skipped": [], "notes": [], "errors": [], "goals": {},
         "model_estimates": [], "machine": {"gpu": "synthetic"}, "mode": "default", "dtype": "bf16",
         "block_size": 16, "copy": {"bytes": 2 << 30}, "vllm": {"status": "measured"}}
    for b in (1, 64):
        for c in (1024, 65536):
            for policy, pct in (("k4v4", k4v4_pct), ("k16v16", 90.0)):
                nb = traffic.decode_bytes(shape, make_layout(shape, policy), b, c, 1)
                us = nb["bytes"] / (pct / 100 * copy_gbs) / 1e3
                if b == 1 and c == 1024:
                    us = 10.0  # launch-bound: same time for both
                r["decode"].append({"shape": shape.name, "policy": policy, "batch": b, "context": c,
                                    "num_splits": 1, "median_us": us, "bytes": nb["bytes"],
                                    "gbs": nb["bytes"] / us / 1e3, "pct_copy": pct})
            k16 = r["decode"][-1]["median_us"]
            r["sdpa_decode"].append({"shape": shape.name, "batch": b, "context": c, "median_us": k16 * 1.1})
            r["vllm_decode"].append({"shape": shape.name, "mode": "fp8", "batch": b, "context": c,
                                     "median_us": k16 * 0.6})
    for p in (PrefillPoint(1, 4096, 0), PrefillPoint(1, 2048, 14336)):
        for policy, us in (("k4v4", 1050.0), ("k16v16", 1000.0)):
            r["prefill"].append({"kind": p.kind, "shape": shape.name, "policy": policy, "num_seqs": 1,
                                 "new_tokens": p.new_tokens, "context": p.context, "median_us": us})
        r["vllm_prefill"].append({"kind": p.kind, "shape": shape.name, "num_seqs": 1, "mode": "bf16",
                                  "new_tokens": p.new_tokens, "context": p.context, "median_us": 2000.0})
    for t in (1, 64):
        r["write"].append({"shape": shape.name, "policy": "k4v4", "tokens": t, "median_us": 4.0})
        r["vllm_write"].append({"shape": shape.name, "mode": "int4_per_token_head", "tokens": t,
                                "median_us": 6.0})
    return r


def test_goals_speedups_and_estimates_on_synthetic_results(tmp_path):
    from benchmarks.analysis import derive
    from benchmarks.plots import make_plots
    from benchmarks.summary import render

    r = derive(_synthetic_gpu_results())
    g = r["goals"]
    assert {k: v["status"] for k, v in g.items()} == dict.fromkeys(GOALS, "met")
    long = _row(r["decode"], policy="k4v4", batch=64, context=65536)
    assert long["speedup_vs_k16v16"] == pytest.approx(512 / 136, rel=0.01)
    assert long["speedup_vs_sdpa"] == pytest.approx(1.1 * long["speedup_vs_k16v16"])
    assert long["speedup_vs_vllm_fp8"] == pytest.approx(0.6 * long["speedup_vs_k16v16"])
    assert g["prefill_int4_vs_bf16"]["time_ratio"]["max"] == pytest.approx(1.05)
    prefill = _row(r["prefill"], policy="k4v4", context=14336)
    assert prefill["speedup_vs_vllm_bf16"] == pytest.approx(2000.0 / 1050.0)
    assert _row(r["write"], tokens=64)["speedup_vs_vllm_int4_per_token_head"] == pytest.approx(1.5)
    est = [e for e in r["model_estimates"] if e["batch"] == 64 and e["context"] == 65536][0]
    step = est["k4v4"]["step_us"]
    assert step == pytest.approx(2 * 8.03e9 / 3000.0 / 1e3 + 32 * (long["median_us"] + 4.0))
    md = render(r)
    assert "**met**" in md and "fp8 " in md and "int4_per_token_head 1.50x" in md
    if make_plots(r, tmp_path):
        assert (tmp_path / "bandwidth.png").exists()

    slow = derive(_synthetic_gpu_results(k4v4_pct=60.0))["goals"]
    assert slow["decode_bandwidth"]["status"] == "missed"
    assert slow["decode_bandwidth"]["worst"]["pct_copy"] == 60.0
