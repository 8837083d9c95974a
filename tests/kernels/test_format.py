"""The page format: documented sizes, layout validation, quantization properties, rotation."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_utils import EXTREME_ROWS, assert_tight_fp16_params
from vllm_int4kv.kernels import page_format
from vllm_int4kv.kernels.page_format import PageLayout, slot_bytes
from vllm_int4kv.kernels.reference import (dequantize, fake_quantize, pack_int4, quant_params, quantize,
                                           unpack_int4)
from vllm_int4kv.kernels.rotation import hadamard, rotate, unrotate


def test_docstring_table_matches_the_code():
    rows = re.findall(r"K(\d+) V(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", page_format.__doc__)
    assert len(rows) == 6
    for k, v, *sizes in rows:
        for head_dim, size in zip((64, 128, 256), sizes):
            assert slot_bytes(head_dim, int(k), int(v)) == int(size), (k, v, head_dim)


def test_k4v4_d128_is_136_bytes_and_3_76x_smaller_than_bf16():
    layout = PageLayout(128, 16, 4, 4)
    assert layout.slot_bytes == 136
    assert layout.compression_vs(2) == pytest.approx(512 / 136)
    assert layout.run_bytes % 16 == 0 and layout.v_plane_offset % 16 == 0


def test_heads_that_are_not_a_power_of_two_store_exactly_their_channels():
    """Phi-3's 96 and Phi-2's 80 channels: rows hold head_dim channels, no padding in the cache."""
    assert PageLayout(96, 16, 4, 4).slot_bytes == 48 + 48 + 8
    assert PageLayout(80, 16, 8, 4).slot_bytes == 80 + 40 + 8
    assert PageLayout(96, 16, 4, 4, k_group=32).slot_bytes == 48 + 48 + 4 * (3 + 1)
    assert PageLayout(80, 16, 16, 16, elem_bytes=2).slot_bytes == 2 * 80 * 2
    assert [page_format.padded_head_dim(d) for d in (32, 48, 80, 96, 128, 192, 256)] == \
        [32, 64, 128, 128, 128, 256, 256]


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_dim=72, block_size=16), "head_dim 72 is not supported: it must be a multiple of 16"),
    (dict(head_dim=16, block_size=16), "from 32 to 256"),
    (dict(head_dim=272, block_size=16), "from 32 to 256"),
    (dict(head_dim=80, block_size=16, k_group=32), "k_group=32 must be a power of two >= 2 dividing"),
    (dict(head_dim=64, block_size=16, k_bits=2), "bits"),
    (dict(head_dim=64, block_size=24), "power of two or a multiple of 16"),
    (dict(head_dim=64, block_size=16, k_group=24), "k_group"),
])
def test_layout_rejects_bad_geometry(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PageLayout(**kwargs)


def test_int4_packing_order_and_round_trip():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)
    packed = pack_int4(codes)
    assert packed[0].item() == 0x10  # channel 0 low nibble, channel 1 high nibble
    assert torch.equal(unpack_int4(packed), codes)


finite = st.floats(-6e4, 6e4, allow_nan=False, width=32)
scales = st.sampled_from([0.0, 1e-30, 1e-7, 1e-3, 1.0, 1e2, 1e4])


@settings(max_examples=200, deadline=None)
@given(base=st.lists(finite, min_size=64, max_size=64), scale=scales, offset=finite,
       bits=st.sampled_from([4, 8]), group=st.sampled_from([16, 64]))
def test_round_trip_within_half_a_step(base, scale, offset, bits, group):
    """Zero, constant, tiny, huge and offset rows all decode within scale/2 and stay finite."""
    x = (torch.tensor(base) / 6e4 * scale + offset).clamp(-65504, 65504)[None]
    codes, s, z = quantize(x, bits, group)
    decoded = dequantize(codes, s, z, group)
    assert torch.isfinite(decoded).all() and torch.isfinite(s).all() and torch.isfinite(z).all()
    step = s.float().repeat_interleave(group, -1)
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + step * (2 ** bits))
    assert ((decoded - x).abs() <= step / 2 + slack).all()


def test_parameters_are_fp16_rounded_outward():
    """Zero rounds down and the scale up, so the largest channel is still representable."""
    x = torch.tensor([[1000.3, 1000.9, 1001.7, 1000.0]])
    codes, s, z = quantize(x, 4, 4)
    assert z.float() <= x.min() and (s.float() * 15 + z.float()) >= x.max()


@settings(max_examples=200, deadline=None)
@given(base=st.lists(finite, min_size=64, max_size=64), scale=scales, offset=finite,
       bits=st.sampled_from([4, 8]), group=st.sampled_from([16, 64]))
def test_parameters_are_the_tightest_fp16_pair(base, scale, offset, bits, group):
    x = (torch.tensor(base) / 6e4 * scale + offset)[None]
    s, z = quant_params(x, bits, group)
    assert_tight_fp16_params(x, s, z, bits, group)


def test_a_large_common_offset_costs_at_most_one_fp16_step():
    """Keys sharing a large offset (Qwen2's k_proj bias): at 1000.7 with a spread of 0.21, a zero nudged
    2**-10 of its magnitude below the minimum landed 1.2 below it and made the K4 scale 0.094; the largest
    fp16 below the minimum (1000.5, fp16 steps are 0.5 there) gives 0.0273, within an fp16 step of the
    smallest scale for that zero."""
    x = 1000.7 + 0.21 * torch.rand(1, 128, generator=torch.Generator().manual_seed(0))
    codes, s, z = quantize(x, 4, 128)
    assert z.item() == 1000.5 and s.item() < 0.0275
    assert_tight_fp16_params(x, s, z, 4, 128)
    assert (dequantize(codes, s, z, 128) - x).abs().max() <= s.float() / 2 + 1e-4


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 64), (4, 16)])
def test_extreme_rows_get_the_tightest_parameters(bits, group):
    """At +-65504 (and past it: clamped), zeros of both signs, constants (the scale must stay a positive
    fp16), fp16 subnormals and values below them, large offsets: the tightest pair, and a round trip
    within half a step."""
    x = torch.stack(list(EXTREME_ROWS.values()))
    codes, s, z = quantize(x, bits, group)
    assert torch.isfinite(s).all() and torch.isfinite(z).all() and (s > 0).all()
    assert_tight_fp16_params(x, s, z, bits, group)
    clamped = x.clamp(-65504, 65504)
    step = s.float().repeat_interleave(group, -1)
    slack = 4 * torch.finfo(torch.float32).eps * (clamped.abs() + step * 2 ** bits)
    assert ((dequantize(codes, s, z, group) - clamped).abs() <= step / 2 + slack).all()


def test_nan_row_does_not_touch_other_rows():
    x = torch.randn(3, 64)
    x[1, 3] = float("nan")
    out = fake_quantize(x, 4, 64)
    assert torch.equal(out[[0, 2]], fake_quantize(x[[0, 2]], 4, 64))


@pytest.mark.parametrize("dim,block", [(64, 64), (128, 128), (256, 256), (96, 32), (80, 16)])
def test_hadamard_is_orthonormal_and_preserves_dot_products(dim, block):
    h = hadamard(dim)
    assert torch.allclose(h @ h.T, torch.eye(dim), atol=1e-6) and torch.equal(h, h.T)
    # non-powers of two: block-diagonal, an outlier spreads over its own block of channels
    assert ((h != 0).sum(1) == block).all()
    q, k = torch.randn(5, dim), torch.randn(7, dim)
    assert torch.allclose(rotate(q) @ rotate(k).T, q @ k.T, atol=1e-4)
    assert torch.allclose(unrotate(rotate(k)), k, atol=1e-5)


def test_rotation_decision_is_measured():
    """Rotation is not forced on: it pays on keys with outlier channels, not on well-spread keys.

    Keys here: Gaussian, or Gaussian plus a few channels 30x larger (the outlier pattern real models
    show). We keep rotation as a measured per-model option (the auto policy tries it) rather than a
    default, because on well-spread keys it costs compute and buys nothing.
    """
    gen = torch.Generator().manual_seed(0)
    plain = torch.randn(2048, 64, generator=gen)
    outliers = plain.clone()
    outliers[:, [3, 17, 40]] *= 30

    def k4_error(x, rotated):
        y = unrotate(fake_quantize(rotate(x), 4, 64)) if rotated else fake_quantize(x, 4, 64)
        return ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()

    gain_outliers = k4_error(outliers, False) / k4_error(outliers, True)
    gain_plain = k4_error(plain, False) / k4_error(plain, True)
    print(f"K4 relative error, no rotation / rotation: outlier keys {gain_outliers:.2f}x, "
          f"gaussian keys {gain_plain:.2f}x")
    assert gain_outliers > 2.0
    assert 0.8 < gain_plain < 1.25
