"""vLLM's own KV-cache formats beside ours (benchmarks/vllm_formats.py, benchmarks/vllm_quality.py).

The emulations are checked against vLLM's kernels in test_vllm_kernels.py; here: their sizes against
vLLM's page arithmetic, the comparison runner end to end, and the claim the README makes from it (on
models whose keys break vLLM's INT4 cache, auto stays within its budget).
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from test_calibration import HEAD_DIM, tiny_model, token_ids

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import vllm_formats, vllm_quality  # noqa: E402
from benchmarks.vllm_formats import FORMATS  # noqa: E402
from vllm_int4kv.policy.calibration import DEFAULT_KL_BUDGET, Settings, calibrate  # noqa: E402
from vllm_int4kv.policy.session import Session  # noqa: E402


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_sizes_are_vllms_page_sizes(head_dim):
    kv_cache = pytest.importorskip("vllm.v1.kv_cache_interface")
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    for fmt in FORMATS.values():
        spec = kv_cache.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=head_dim,
                                          dtype=STR_DTYPE_TO_TORCH_DTYPE[fmt.name],
                                          kv_quant_mode=kv_cache.get_kv_quant_mode(fmt.name))
        page = TritonAttentionBackend.customize_spec(spec).page_size_bytes
        assert fmt.bytes_per_token(head_dim) == page / (16 * 2), fmt.name


def test_emulations_quantize_and_keep_shape_and_dtype():
    x = torch.randn(3, 2, 40, 64, generator=torch.Generator().manual_seed(0)) * 4
    for fmt in FORMATS.values():
        y = fmt.quantize(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        error = ((y - x).norm() / x.norm()).item()
        assert 0 < error < (0.12 if fmt.name.startswith("int4") else 0.05), (fmt.name, error)
    # int4: at most 16 levels per (token, head) in the rotated basis (apart up to fp32 rounding)
    for row in vllm_formats._rht(FORMATS["int4_per_token_head"].quantize(x)).flatten(0, 2)[:8]:
        values = row.sort().values
        assert 1 + int((values.diff() > 1e-4 * values.abs().max()).sum()) <= 16


def test_rht_is_its_own_inverse_up_to_block_scale():
    for d in (64, 80, 96):  # 80 and 96: block-diagonal in blocks of 16 and 32, as vLLM does
        x = torch.randn(5, d)
        assert torch.allclose(vllm_formats._rht(vllm_formats._rht(x), inverse=True), x, atol=1e-5)


@pytest.fixture(scope="module")
def hard_models():
    """Tiny models whose keys vLLM's INT4 cache cannot hold: a large key offset, outlier channels."""
    out = {}
    for label, model in (("offset", tiny_model(key_bias=20.0)), ("outliers", tiny_model(outlier_scale=14.0))):
        with Session(model, token_ids()) as session:
            # margin 1: these tiny models are shaped around a target of 0.01 nats
            result = calibrate(session, HEAD_DIM, Settings(margin=1.0), measure_all=True)
            vllm = {f.name: session.measure(f.name, f.fake_quantize_kv) for f in FORMATS.values()}
        out[label] = (result, vllm)
    return out


@pytest.mark.parametrize("label", ["offset", "outliers"])
def test_auto_keeps_the_budget_where_vllm_int4_breaks_it(hard_models, label):
    result, vllm = hard_models[label]
    bytes_per_token, kl = result.chosen  # a uniform layout or a per-layer map, as measured
    print(f"\n{label}: vLLM int4_per_token_head KL {vllm['int4_per_token_head'].kl:.4f}, fp8 "
          f"{vllm['fp8'].kl:.4f}; auto -> {result.policy.name} KL {kl:.4f}, {bytes_per_token} B")
    assert vllm["int4_per_token_head"].kl > DEFAULT_KL_BUDGET
    assert kl <= DEFAULT_KL_BUDGET


def test_outlier_keys_cost_auto_one_scale_per_group_over_vllm_int4(hard_models):
    """With outlier key channels, rotation plus 32-channel key groups fit where vLLM's rotated per-head
    INT4 does not: 76 B per token and head against its 72 (4 more bytes of scales)."""
    result, vllm = hard_models["outliers"]
    assert result.policy.name == "k4v4-g32-rot"
    assert result.measured("k4v4-g32-rot").bytes_per_token == \
        FORMATS["int4_per_token_head"].bytes_per_token(HEAD_DIM) + 4


def test_fp8_with_unit_scale_breaks_on_a_key_offset(hard_models):
    """vLLM's default fp8 cache keeps e4m3's relative step (1/16) of a +20 offset: over budget."""
    _, vllm = hard_models["offset"]
    assert vllm["fp8"].kl > DEFAULT_KL_BUDGET
    assert vllm["int8_per_token_head"].kl <= DEFAULT_KL_BUDGET


def test_runner_writes_a_complete_comparison(tmp_path, monkeypatch):
    build_tiny_llama = pytest.importorskip("vllm_int4kv.testing.tiny_model").build_tiny_llama
    folder = build_tiny_llama(tmp_path / "tiny", seed=0)
    tiny_model().save_pretrained(folder)
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(400)))
    monkeypatch.delenv("VLLM_INT4KV_KL_BUDGET", raising=False)
    vllm_quality.main([str(folder), "--eval-text", str(text), "--eval-chunks", "2", "--prompts", "1",
                       "--max-tokens", "96", "--long-tokens", "200", "--maps", "k4v4;1:k8v4,k8v4;1:k4v4-rot",
                       "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "vllm-formats.json").read_text())
    rows = {r["cache"]: r for r in report["rows"]}
    assert set(FORMATS) <= set(rows) and {"k4v4", "k8v4", "k16v16", "k4v4;1:k8v4", "k8v4;1:k4v4-rot"} <= set(rows)
    assert rows["k4v4;1:k8v4"]["bytes_per_token"] == (72 + 104) / 2
    sizes = [r["bytes_per_token"] for r in report["rows"]]
    assert sizes == sorted(sizes)
    assert sum(r["auto"] for r in report["rows"]) == 1 and rows[report["decision"]]["auto"]
    assert rows["k16v16"]["kl"] == 0 and rows["k16v16"]["ppl_delta"] == 0
    assert rows["int8_per_token_head"]["kl"] < rows["int4_per_token_head"]["kl"]
    assert all(r["ppl"] > 1 and r["within_budget"] == (r["kl"] <= report["target"]) for r in rows.values())
    markdown = (tmp_path / "out" / "vllm-formats.md").read_text()
    assert "int4_per_token_head | vLLM 0.32 | 72 |" in markdown and "← best uniform" in markdown
    assert "| k4v4;1:k8v4 | vllm-int4kv | 88 |" in markdown  # a map's mean bytes, not 88.0


def test_runner_can_measure_less(tmp_path, monkeypatch):
    """--vllm-formats picks vLLM's formats, --until-best-uniform stops our candidates at the best uniform
    one (cheapest first, as auto does), --no-uniform-search measures only --maps; an unknown format name
    stops with the list to choose from."""
    build_tiny_llama = pytest.importorskip("vllm_int4kv.testing.tiny_model").build_tiny_llama
    folder = build_tiny_llama(tmp_path / "tiny", seed=0)
    tiny_model().save_pretrained(folder)
    monkeypatch.delenv("VLLM_INT4KV_KL_BUDGET", raising=False)
    common = [str(folder), "--prompts", "1", "--max-tokens", "96", "--long-tokens", "0"]
    vllm_quality.main(common + ["--vllm-formats", "int4_per_token_head", "--until-best-uniform",
                                "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "vllm-formats.json").read_text())
    ours = [r for r in report["rows"] if r["by"] == "vllm-int4kv"]
    assert [r["cache"] for r in report["rows"] if r["by"] != "vllm-int4kv"] == ["int4_per_token_head"]
    best = next(r for r in ours if r["auto"])
    assert best["cache"] == report["decision"] and best["within_budget"]
    # nothing costlier measured, but k8v4: the ratio classifier's evidence is always measured
    assert [r["cache"] for r in ours if r["bytes_per_token"] > best["bytes_per_token"]] in ([], ["k8v4"])
    assert "k16v16" not in [r["cache"] for r in ours] or best["cache"] == "k16v16"
    vllm_quality.main(common + ["--vllm-formats", "fp8", "--no-uniform-search", "--maps", "k8v4,k4v4;1:k8v4",
                                "--out", str(tmp_path / "maps")])
    report = json.loads((tmp_path / "maps" / "vllm-formats.json").read_text())
    assert [r["cache"] for r in report["rows"]] == ["k4v4;1:k8v4", "k8v4", "fp8"] and report["decision"] is None
    with pytest.raises(SystemExit, match="unknown vLLM formats"):
        vllm_quality.main(common + ["--vllm-formats", "int3", "--out", str(tmp_path / "bad")])


def test_vllm_cpu_fp8_cache_truncates_the_mantissa():
    """docs/quality/notes.md explains vLLM's CPU fp8 KL by this: its CPU cache write truncates e4m3
    mantissas (the GPU write rounds to nearest, as vllm_formats.fp8_per_tensor does)."""
    ops = pytest.importorskip("vllm._custom_ops")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 64, generator=gen) * 3
    caches = [torch.zeros(1, 1, 32, 64, dtype=torch.uint8) for _ in range(2)]
    try:
        ops.cpu_attn_reshape_and_cache(x, x.clone(), *caches, torch.arange(32), "vec", k_scale=1.0,
                                       v_scale=1.0, kv_cache_dtype="fp8")
    except (AttributeError, NotImplementedError, RuntimeError) as exc:  # no CPU kernel here (no AVX-512)
        pytest.skip(f"vLLM's CPU fp8 cache write is not available: {exc}")
    stored = caches[0].view(torch.float8_e4m3fn).float().flatten().sort().values  # layout aside: as a set
    rounded = vllm_formats.fp8_per_tensor(x).flatten().sort().values
    truncated = (x.view(torch.int32) & -(1 << 20)).view(torch.float32).flatten().sort().values  # 3-bit mantissa
    assert (stored == truncated).float().mean() > 0.99
    assert (stored == rounded).float().mean() < 0.7
