"""Cache-write kernel vs the reference writer, byte for byte; padding, isolation, extreme inputs."""
import pytest
import torch

from kernel_utils import EXTREME_ROWS, POISON, assert_tight_fp16_params
from vllm_int4kv.kernels.cache_write import write_kv_cache
from vllm_int4kv.kernels.page_format import PageLayout
from vllm_int4kv.kernels.reference import _run_views, read_cache_reference, write_cache_reference

LAYOUTS = {
    "k4v4_d64": PageLayout(64, 16, 4, 4, elem_bytes=4),
    "k8v4_d128": PageLayout(128, 16, 8, 4, elem_bytes=4),
    "k16v4_d64_bs32": PageLayout(64, 32, 16, 4, elem_bytes=4),
    "k8v8_d256": PageLayout(256, 16, 8, 8, elem_bytes=4),
    "k16v16_d64": PageLayout(64, 16, 16, 16, elem_bytes=4),
    "k4v4_g16_d64": PageLayout(64, 16, 4, 4, k_group=16, elem_bytes=4),
    # heads that are not a power of two: the kernel spans 128 (or 64) channels and masks the rest
    "k4v4_d96": PageLayout(96, 16, 4, 4, elem_bytes=4),
    "k4v4_g32_d96": PageLayout(96, 16, 4, 4, k_group=32, elem_bytes=4),
    "k8v4_g16_d80": PageLayout(80, 16, 8, 4, k_group=16, elem_bytes=4),
    "k16v16_d80": PageLayout(80, 16, 16, 16, elem_bytes=4),
    "k8v8_d48": PageLayout(48, 16, 8, 8, elem_bytes=4),
    "k8v4_d64_bs48": PageLayout(64, 48, 8, 4, elem_bytes=4),  # hybrid models' blocks: multiples of 16
}


def poisoned_cache(layout, num_blocks=9, heads=2):
    return torch.full((num_blocks, heads, layout.run_bytes), POISON, dtype=torch.uint8)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_kernel_writes_the_reference_bytes(name):
    layout = LAYOUTS[name]
    gen = torch.Generator().manual_seed(1)
    tokens = 21
    key = torch.randn(tokens, 2, layout.head_dim, generator=gen) * 3 + 1
    value = torch.randn(tokens, 2, layout.head_dim, generator=gen)
    slots = torch.randperm(9 * layout.block_size, generator=gen)[:tokens].to(torch.int32)
    slots[[2, 11]] = -1  # padding tokens are skipped
    ours, ref = poisoned_cache(layout), poisoned_cache(layout)
    write_kv_cache(key, value, ours, slots, layout)
    write_cache_reference(ref, key, value, slots, layout)
    assert torch.equal(ours, ref)
    written = (ours != POISON).any(-1).sum().item()  # coarse: some runs were touched, the rest not
    assert written > 0


@pytest.mark.parametrize("name", ["k4v4_d96", "k8v4_g16_d80", "k16v16_d80"])
def test_padded_heads_read_and_write_only_their_channels(name):
    """Rows handed over inside wider rows (a fused QKV tensor): NaN past head_dim must not be read
    (it would poison the row's range), and no byte past a slot's row may be written."""
    layout = LAYOUTS[name]
    d = layout.head_dim
    gen = torch.Generator().manual_seed(2)
    wide = torch.full((9, 2, d + 16), float("nan"))
    wide[..., :d] = torch.randn(9, 2, d, generator=gen)
    key, value = wide[..., :d], wide[..., :d] * 0.5
    slots = torch.arange(9, dtype=torch.int32) * 5
    ours, ref = poisoned_cache(layout), poisoned_cache(layout)
    write_kv_cache(key, value, ours, slots, layout)
    write_cache_reference(ref, key.contiguous(), value.contiguous(), slots, layout)
    assert torch.equal(ours, ref)
    k, _ = read_cache_reference(ours, layout, torch.arange(ours.shape[0]), torch.float32)
    assert torch.isfinite(k[slots.long()]).all()


def test_padding_slots_write_nothing():
    layout = LAYOUTS["k4v4_d64"]
    cache = poisoned_cache(layout)
    key = torch.randn(4, 2, 64)
    write_kv_cache(key, key, cache, torch.full((4,), -1, dtype=torch.int32), layout)
    assert (cache == POISON).all()


def test_nan_and_inf_stay_in_their_own_slot():
    layout = LAYOUTS["k4v4_d64"]
    key = torch.randn(6, 2, 64)
    value = torch.randn(6, 2, 64)
    key[2, 0, 5] = float("nan")
    value[4, 1, 7] = float("inf")
    key[4, 0, 9] = float("-inf")
    slots = torch.arange(6, dtype=torch.int32) * 3
    dirty, clean = poisoned_cache(layout), poisoned_cache(layout)
    write_kv_cache(key, value, dirty, slots, layout)
    keep = torch.tensor([0, 1, 3, 5])
    write_kv_cache(key[keep], value[keep], clean, slots[keep], layout)
    assert torch.equal(dirty[:, :, :].view(-1)[clean.view(-1) != POISON], clean.view(-1)[clean.view(-1) != POISON])
    k, v = read_cache_reference(dirty, layout, torch.arange(dirty.shape[0]), torch.float32)
    assert torch.isfinite(v[slots[4].long(), 1]).all(), "inf saturates to the fp16 range"
    assert torch.isfinite(k[slots[4].long(), 0]).all()
    assert torch.isfinite(k[slots[keep].long()]).all() and torch.isfinite(v[slots[keep].long()]).all()


def test_extreme_rows_round_trip_through_the_kernel():
    layout = PageLayout(64, 16, 4, 8, elem_bytes=4)
    rows = torch.stack([torch.zeros(64), torch.full((64,), 7.25), torch.randn(64) * 1e4,
                        torch.randn(64) * 1e-6, torch.randn(64) + 300.0, torch.linspace(-1, 1, 64)])
    rows = rows[:, None, :]  # [6 tokens, 1 head, 64]
    cache = poisoned_cache(layout, heads=1)
    slots = torch.arange(6, dtype=torch.int32)
    write_kv_cache(rows, rows, cache, slots, layout)
    k, v = read_cache_reference(cache, layout, torch.arange(cache.shape[0]), torch.float32)
    for decoded, levels in ((k[:6, 0], 15), (v[:6, 0], 255)):
        assert torch.isfinite(decoded).all()
        span = rows[:, 0].amax(-1) - rows[:, 0].amin(-1)
        bound = span / levels * 0.5 * 1.01 + rows[:, 0].abs().amax(-1) * 2 ** -9 + 1e-6
        assert ((decoded - rows[:, 0]).abs().amax(-1) <= bound).all()


@pytest.mark.parametrize("layout,dtype", [
    (PageLayout(64, 16, 4, 8, elem_bytes=4), torch.float32),
    (PageLayout(64, 16, 8, 4, k_group=16, elem_bytes=4), torch.float32),
    (PageLayout(48, 16, 4, 4, elem_bytes=4), torch.float32),  # a padded head: tiles span 64 channels
    (PageLayout(64, 16, 4, 4, v_group=32, elem_bytes=2), torch.float16),
], ids=["k4v8", "k8g16v4", "k4v4_d48", "k4v4g32_fp16"])
def test_extreme_rows_get_the_reference_bytes_and_the_tightest_parameters(layout, dtype):
    """The kernel's zero is the largest fp16 at most each group's minimum and its scale the smallest
    positive fp16 that covers the maximum (``kernel_utils.EXTREME_ROWS``: +-65504 and past it, zeros of
    both signs, constants, subnormals, large offsets), bit for bit what the reference writes."""
    d = layout.head_dim
    rows = torch.stack(list(EXTREME_ROWS.values()))[:, None, :d].to(dtype)  # [tokens, 1 head, d]
    key, value = rows, rows.flip(-1).contiguous()
    slots = torch.arange(rows.shape[0], dtype=torch.int32)
    ours, ref = poisoned_cache(layout, num_blocks=2, heads=1), poisoned_cache(layout, num_blocks=2, heads=1)
    write_kv_cache(key, value, ours, slots, layout)
    write_cache_reference(ref, key, value, slots, layout)
    assert torch.equal(ours, ref)
    params = _run_views(ours, layout)[2].contiguous().view(torch.float16).transpose(1, 2).flatten(0, 1)
    params = params[:rows.shape[0], 0]  # [tokens, 2 * (k_groups + v_groups)]: (scale, zero) per group
    nk = 2 * layout.k_groups
    for x, (scale, zero), bits, group in ((key, params[:, :nk].unflatten(-1, (-1, 2)).unbind(-1),
                                           layout.k_bits, layout.k_group),
                                          (value, params[:, nk:].unflatten(-1, (-1, 2)).unbind(-1),
                                           layout.v_bits, layout.v_group)):
        assert_tight_fp16_params(x[:, 0].float(), scale, zero, bits, group)


def test_write_contract_errors():
    layout = LAYOUTS["k4v4_d64"]
    cache = poisoned_cache(layout)
    key = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="head_dim"):
        write_kv_cache(key[..., :32], key[..., :32], cache, torch.zeros(3, dtype=torch.int32), layout)
    with pytest.raises(ValueError, match="KV heads"):
        write_kv_cache(key[:, :1], key[:, :1], cache, torch.zeros(3, dtype=torch.int32), layout)
    with pytest.raises(ValueError, match="elem_bytes"):
        write_kv_cache(key.half(), key.half(), cache, torch.zeros(3, dtype=torch.int32), layout)


@pytest.mark.parametrize("writer", ["kernel", "reference"])
def test_slots_past_the_cache_are_refused(writer):
    """A slot past num_blocks * block_size was written past the cache (the kernel) or failed with an
    IndexError (the reference, the CPU path's writer): both name the token. Negative slots are padding."""
    layout = LAYOUTS["k4v4_d64"]
    cache = poisoned_cache(layout)  # 9 blocks of 16: slots 0-143
    key = torch.randn(4, 2, 64)
    write = write_kv_cache if writer == "kernel" else (
        lambda k, v, c, slots, lay: write_cache_reference(c, k, v, slots, lay))
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] = 144 is past the cache's 144 slots "
                                         r"\(9 blocks of 16\)"):
        write(key, key, cache, torch.tensor([0, -1, 144, 5], dtype=torch.int64), layout)
    assert (cache == POISON).all(), "nothing written before the check"
    write(key, key, cache, torch.tensor([0, -1, 143, -7], dtype=torch.int32), layout)
    assert (cache != POISON).any()


def test_slot_mapping_contract():
    layout = LAYOUTS["k4v4_d64"]
    key = torch.randn(4, 2, 64)
    with pytest.raises(TypeError, match="slot_mapping must be a contiguous 1-D int32/int64 tensor"):
        write_kv_cache(key, key, poisoned_cache(layout), torch.arange(4.0), layout)
    with pytest.raises(TypeError, match="slot_mapping must be a contiguous 1-D int32/int64 tensor"):
        write_kv_cache(key, key, poisoned_cache(layout), torch.arange(8)[::2], layout)
    with pytest.raises(ValueError, match="must agree"):
        write_kv_cache(key, key.double(), poisoned_cache(layout), torch.arange(4), layout)
