"""The batched torch path (CPU serving) equals the per-sequence reference, on poisoned caches."""
import pytest
import torch

from kernel_utils import alibi_slopes, make_case
from vllm_int4kv.kernels import torch_attention
from vllm_int4kv.kernels.reference import error_ratio, paged_attention_reference
from vllm_int4kv.kernels.torch_attention import paged_attention_torch

MIXED = dict(seq_lens=[37, 50, 19, 70, 5, 130, 22], q_lens=[1, 13, 19, 3, 1, 1, 0])  # q_len 0: nothing new
DECODE = dict(seq_lens=[45, 130, 7, 64, 1, 99, 16], q_lens=[1] * 7)
LONG = dict(seq_lens=[400 + 13 * i for i in range(32)], q_lens=[1] * 32)
# fp32 rounding only, but looser than the Triton kernel's 1e-6: the (scale, zero) terms applied to scores
# and probabilities cancel (measured ~1e-5 at 400+ tokens); a wrong scale or zero gives > 1e-2.
TOLERANCE = 1e-4


def _both(case, **kw):
    args = (case.query, case.cache, case.layout, case.block_table, case.seq_lens, case.query_start_loc)
    return paged_attention_torch(*args, **kw), paged_attention_reference(*args, **kw)


def _garbage_table_padding(case):
    """Entries past each sequence's blocks: out-of-range ids (the path must never read them)."""
    bs = case.layout.block_size
    for s, n in enumerate(case.seq_lens.tolist()):
        case.block_table[s, -(-n // bs):] = 10 ** 6
    return case


@pytest.mark.parametrize("k_bits,v_bits,k_group,v_group", [
    (4, 4, None, None), (8, 4, None, None), (16, 16, None, None), (8, 8, None, None), (16, 4, None, None),
    (4, 4, 16, None), (8, 4, 32, None), (4, 8, None, 16), (8, 4, None, 32)],
    ids=["k4v4", "k8v4", "k16v16", "k8v8", "k16v4", "k4v4_g16", "k8v4_g32", "k4v8_vg16", "k8v4_vg32"])
@pytest.mark.parametrize("shape", [MIXED, DECODE, LONG], ids=["mixed", "decode", "long_decode"])
def test_equals_reference(shape, k_bits, v_bits, k_group, v_group):
    case = _garbage_table_padding(make_case(**shape, k_bits=k_bits, v_bits=v_bits, k_group=k_group,
                                            v_group=v_group))
    ours, ref = _both(case)
    assert not ours.isnan().any(), "a poisoned (unwritten) cache byte reached the output"
    assert error_ratio(ours, ref) < TOLERANCE


@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(4, 1, 64), (1, 7, 128), (3, 3, 64), (1, 8, 256)],
                         ids=["mha", "gqa7_d128", "smollm2_9q_3kv", "mqa_d256"])
def test_gqa_and_head_dims(num_kv_heads, group, head_dim):
    case = make_case(**MIXED, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim)
    ours, ref = _both(case)
    assert error_ratio(ours, ref) < TOLERANCE


def _poison_before_window(case, window: int) -> int:
    """Point the blocks wholly before every new row's window out of range (vLLM points them at its null
    block: reading them is waste, and here an IndexError); how many."""
    bs = case.layout.block_size
    q_lens = (case.query_start_loc[1:] - case.query_start_loc[:-1]).tolist()
    count = 0
    for s, (n, q) in enumerate(zip(case.seq_lens.tolist(), q_lens)):
        before = max(0, n - q - window + 1) // bs
        case.block_table[s, :before] = 10 ** 6
        count += before if q else 0
    return count


def test_sliding_window_softcap_and_fp16():
    """Blocks wholly before the window of 24 of every new row are never needed, so never read."""
    case = make_case(**MIXED, dtype=torch.float16)
    ref = paged_attention_reference(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                                    case.query_start_loc, sliding_window=24, softcap=20.0)
    assert _poison_before_window(case, 24)
    ours = paged_attention_torch(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                                 case.query_start_loc, sliding_window=24, softcap=20.0)
    assert not ours.isnan().any()
    assert error_ratio(ours, ref) < TOLERANCE


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (16, 16)])
@pytest.mark.parametrize("options", [{}, dict(sliding_window=20, softcap=5.0)], ids=["plain", "window_softcap"])
def test_attention_sinks(shape, k_bits, v_bits, options):
    """gpt-oss's sinks: the reference appends a sink column to the softmax; this path scales the
    probabilities by sigmoid(logsumexp - sink), and in prefill leaves SDPA (no place for a sink)."""
    case = make_case(**shape, k_bits=k_bits, v_bits=v_bits)
    sinks = torch.randn(case.query.shape[1], generator=torch.Generator().manual_seed(3)) + 2.0
    ours, ref = _both(case, sinks=sinks, **options)
    rows = ~ref.isnan()
    assert error_ratio(ours[rows], ref[rows]) < TOLERANCE
    assert error_ratio(ref[rows], _both(case, **options)[1][rows]) > 0.3  # the sinks take a real share


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("options", [{}, dict(sliding_window=20, softcap=5.0)], ids=["plain", "window_softcap"])
def test_alibi(shape, options):
    """ALiBi (Bloom, Falcon): a bias on the decode scores; prefill leaves SDPA for explicit scores."""
    case = make_case(**shape, num_kv_heads=4, group=2)
    slopes = alibi_slopes(case.query.shape[1])
    ours, ref = _both(case, alibi_slopes=slopes, **options)
    rows = ~ref.isnan()
    assert error_ratio(ours[rows], ref[rows]) < TOLERANCE
    assert error_ratio(ref[rows], _both(case, **options)[1][rows]) > 0.3  # the bias moves the output


def test_decode_batch_in_several_chunks(monkeypatch):
    """A large batch is dequantized a bounded number of values at a time: the same result."""
    case = make_case(**DECODE)
    args = (case.query, case.cache, case.layout, case.block_table, case.seq_lens, case.query_start_loc)
    whole = paged_attention_torch(*args)
    chunks, decode_chunk = [], torch_attention._decode_chunk

    def counted(query, *rest):
        chunks.append(len(query))
        return decode_chunk(query, *rest)

    monkeypatch.setattr(torch_attention, "_decode_chunk", counted)
    monkeypatch.setattr(torch_attention, "MAX_GATHERED_VALUES", 100 * 2 * 64)  # ~100 positions of 2 heads
    chunked = paged_attention_torch(*args)
    assert len(chunks) > 2 and sum(chunks) == len(DECODE["seq_lens"])
    assert error_ratio(chunked, whole) < 1e-6  # padding to another length may reorder fp32 sums


def test_scratch_reuse_across_sizes_and_layouts():
    """The gathered pages and fp32 codes live in buffers reused by the next call: a large call, then a
    smaller one of another layout, then a larger head size; each is exact, earlier results unchanged."""
    cases = [make_case(**LONG), make_case(**DECODE, k_bits=8, v_bits=8, seed=1),
             make_case(**LONG, k_bits=16, v_bits=4, head_dim=128, seed=2)]
    results = [_both(case) for case in cases]
    assert torch_attention._scratch.buffers, "the scratch was not used"
    for ours, ref in results:
        assert error_ratio(ours, ref) < TOLERANCE


@pytest.mark.parametrize("options", [{}, dict(softcap=20.0), dict(sliding_window=40)], ids=str)
def test_long_prefill_in_bounded_steps(monkeypatch, options):
    """A prompt is attended a bounded number of query rows at a time (the reference builds all of its
    ``[heads, rows, context]`` scores at once: gigabytes at a few thousand tokens): the same result."""
    case = make_case(seq_lens=[300, 90, 200], q_lens=[300, 40, 30], num_kv_heads=2, group=3)
    args = (case.query, case.cache, case.layout, case.block_table, case.seq_lens, case.query_start_loc)
    ref = paged_attention_reference(*args, **options)
    if options.get("sliding_window"):  # blocks before every new row's window: poisoned, never read
        _poison_before_window(case, options["sliding_window"])
    steps, sdpa = [], torch_attention.F.scaled_dot_product_attention

    def counted(q, k, v, attn_mask, **kw):
        steps.append(q.shape[1] * q.shape[2] * k.shape[2])
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch_attention.F, "scaled_dot_product_attention", counted)
    monkeypatch.setattr(torch_attention, "MAX_PREFILL_SCORES", 6 * 300 * 32)  # 32 rows of 6 heads at 300
    ours = paged_attention_torch(*args, **options)
    assert error_ratio(ours, ref) < TOLERANCE
    if not options.get("softcap"):  # softcap has no SDPA form: the same steps, written out
        assert len(steps) >= 300 // 32 and max(steps) <= 6 * 300 * 32


def test_scratch_inside_and_outside_inference_mode():
    """vLLM calls under torch.inference_mode; buffers made there cannot be written outside it (calibration,
    tests), and the other way round must work too."""
    case = make_case(**DECODE)
    with torch.inference_mode():
        inside, ref = _both(case)
    outside, _ = _both(case)
    with torch.inference_mode():
        again, _ = _both(case)
    for out in (inside, outside, again):
        assert error_ratio(out, ref) < TOLERANCE


def test_scratch_keeps_no_buffer_past_its_bound(monkeypatch):
    """A sequence longer than a chunk gets fresh tensors, freed after the call, not kept for good."""
    monkeypatch.setattr(torch_attention._Scratch, "KEEP_BYTES", 64 << 10)
    monkeypatch.setattr(torch_attention._scratch, "buffers", {})
    case = make_case(**LONG)  # ~800 positions x 2 heads x 64 channels: 400 KiB of fp32 per plane
    ours, ref = _both(case)
    assert error_ratio(ours, ref) < TOLERANCE
    kept = torch_attention._scratch.buffers
    assert all(b.numel() * b.element_size() <= 64 << 10 for b in kept.values()), \
        {k: b.numel() for k, b in kept.items()}


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_block_ids_outside_the_cache_are_refused(shape):
    """A negative id in a prefill sequence was read silently (Python indexing: the cache's last block);
    one past the end failed with an IndexError naming neither sequence nor entry. Both raise ValueError."""
    for block_id in (None, -1):
        case = make_case(**shape)
        num_blocks = case.cache.shape[0]
        case.block_table[2, 0] = num_blocks if block_id is None else block_id
        args = (case.query, case.cache, case.layout, case.block_table, case.seq_lens, case.query_start_loc)
        with pytest.raises(ValueError, match=rf"block_table\[2, 0\] = {case.block_table[2, 0]} is not a "
                                             rf"block of the cache \(0 <= id < {num_blocks}\): sequence 2"):
            paged_attention_torch(*args)
    case = _garbage_table_padding(make_case(**shape))  # entries no sequence reads are not checked
    _poison_before_window(case, 24)
    paged_attention_torch(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                          case.query_start_loc, sliding_window=24)
