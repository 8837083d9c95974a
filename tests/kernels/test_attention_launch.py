"""Unified paged-attention kernel: what the launcher refuses or checks (argument contract, block ids,
lengths and offsets, opt-in block checks, an interpreter that cannot run the loop) and the GPU-only code
paths (tile choices, 16-bit queries, codes OR-ed into a float bias, the inline PTX, tiles through shared
memory). The comparisons with the torch reference and the error budget are in test_attention_kernel.py.
"""
import pytest
import torch

from kernel_utils import make_case
from test_attention_kernel import DECODE, MIXED, run_kernel, run_reference
from vllm_int4kv.kernels import attention
from vllm_int4kv.kernels.attention import paged_attention
from vllm_int4kv.kernels.reference import error_ratio, paged_attention_reference


def test_contract_errors_are_clear():
    case = make_case(**DECODE)
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        paged_attention(case.query[:, :3], case.cache, case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=1, max_seq_len=130)
    with pytest.raises(TypeError, match="uint8"):
        paged_attention(case.query, case.cache.float(), case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=1, max_seq_len=130)
    with pytest.raises(ValueError, match="num_splits must be a power of two"):
        run_kernel(case, num_splits=3)
    with pytest.raises(ValueError, match="num_warps must be"):
        run_kernel(case, num_warps=3)
    with pytest.raises(ValueError, match="num_stages must be 1 to 8"):
        run_kernel(case, num_stages=0)
    assert error_ratio(run_kernel(case, num_stages=1), run_reference(case)) < 1e-6  # a launch option only


def test_more_contract_errors_are_clear():
    """What the host can check without a device sync: devices, dtypes, strides, and that the block table
    has a column for each block of max_seq_len tokens."""
    case = make_case(**DECODE)  # blocks of 16, at most 130 tokens: 9 blocks, a table of 10 columns
    with pytest.raises(ValueError, match="max_seq_len 161 needs 11 blocks of 16; block_table has 10 columns"):
        paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=1, max_seq_len=161)
    with pytest.raises(ValueError, match="seq_lens must be 1-D with contiguous entries"):
        paged_attention(case.query, case.cache, case.layout, case.block_table,
                        torch.stack((case.seq_lens, case.seq_lens), 1)[:, 0], case.query_start_loc,
                        max_query_len=1, max_seq_len=130)
    with pytest.raises(TypeError, match="block_table must be an int32/int64 tensor"):
        paged_attention(case.query, case.cache, case.layout, case.block_table.float(), case.seq_lens,
                        case.query_start_loc, max_query_len=1, max_seq_len=130)
    with pytest.raises(ValueError, match="out must be torch.float32"):
        run_kernel(case, out=torch.empty_like(case.query, dtype=torch.float16))


def _bad_entry(case, seq: int, entry: int, block_id: int):
    case.block_table = case.block_table.clone()
    case.block_table[seq, entry] = block_id
    return case


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_block_ids_outside_the_cache_are_refused(shape):
    """A block id past the end of the cache (or negative) was read without a word (the output changed; a
    probe crashed the interpreter): on CPU every block a sequence reads is checked before the launch."""
    case = make_case(**shape)
    num_blocks = case.cache.shape[0]
    with pytest.raises(ValueError, match=rf"block_table\[1, 2\] = {num_blocks} is not a block of the "
                                         rf"cache \(0 <= id < {num_blocks}\): sequence 1 reads it for its "
                                         "tokens 32 to 47"):
        run_kernel(_bad_entry(make_case(**shape), 1, 2, num_blocks))
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1 is not a block"):
        run_kernel(_bad_entry(make_case(**shape), 0, 0, -1))
    # entries past a sequence's blocks, and those before every row's window, are never read: anything goes
    expected = run_reference(case, sliding_window=16)
    case.block_table = case.block_table.clone()
    for s, n in enumerate(case.seq_lens.tolist()):
        case.block_table[s, -(-n // 16):] = (10 ** 6, -5)[s % 2]
    case.block_table[1, 0] = num_blocks  # 50 or 130 tokens, a window of 16 from the first new row
    assert error_ratio(run_kernel(case, sliding_window=16), expected) < 1e-6


def test_lengths_and_offsets_the_launch_cannot_follow_are_refused():
    """A length past the block table's columns (the kernel would read the next row as block ids), more
    query tokens than max_query_len (decode tiles drop the causal mask) or than the sequence holds."""
    case = make_case(**MIXED)
    seq_lens = case.seq_lens.clone()
    seq_lens[3] = 16 * case.block_table.shape[1] + 1  # max_seq_len (70) is what the caller says
    with pytest.raises(ValueError, match="sequence 3 has 97 tokens, 7 blocks of 16; block_table has 6 col"):
        paged_attention(case.query, case.cache, case.layout, case.block_table, seq_lens, case.query_start_loc,
                        max_query_len=19, max_seq_len=70)
    with pytest.raises(ValueError, match="sequence 2 has 19 query tokens, more than max_query_len 13"):
        paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=13, max_seq_len=70)
    case.seq_lens = case.seq_lens.clone()
    case.seq_lens[1] = 12
    with pytest.raises(ValueError, match=r"sequence 1 has 13 query tokens but seq_lens\[1\] = 12"):
        run_kernel(case)
    case = make_case(**MIXED)
    starts = case.query_start_loc.clone()
    starts[2] = 40  # sequence 2 would run from 40 to 33
    with pytest.raises(ValueError, match="query_start_loc falls at sequence 2: 40 to 33"):
        paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens, starts,
                        max_query_len=19, max_seq_len=70)
    with pytest.raises(ValueError, match="query_start_loc runs from 0 to 36, outside the 35 query tokens"):
        paged_attention(case.query[:35], case.cache, case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=19, max_seq_len=70)


def test_block_checks_are_opt_in_on_a_gpu(monkeypatch):
    """On a GPU reading the ids is a device sync per call: only with validate_blocks=True or
    VLLM_INT4KV_CHECK_BLOCKS=1; on CPU always, unless a caller turns them off."""
    from vllm_int4kv.kernels.block_checks import CHECK_BLOCKS_ENV, checks_blocks

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(CHECK_BLOCKS_ENV, raising=False)
    assert not checks_blocks(cuda, None) and checks_blocks(cuda, True)
    assert checks_blocks(cpu, None) and not checks_blocks(cpu, False)
    for value, checks in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(CHECK_BLOCKS_ENV, value)
        assert checks_blocks(cuda, None) == checks, value
    assert not checks_blocks(cuda, False)
    calls = []
    monkeypatch.setattr(attention, "check_block_table", lambda *args, **kw: calls.append(kw["num_blocks"]))
    case = make_case(**DECODE)
    run_kernel(case, validate_blocks=False)
    assert not calls
    run_kernel(case)
    assert calls == [case.cache.shape[0]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check is for CPU runs")
def test_an_interpreter_that_cannot_run_the_loop_is_named_before_the_launch(monkeypatch):
    """Triton 3.6's interpreter with NumPy 2.4 fails inside the tile loop (triton-lang/triton#9171);
    the launcher must say so, and what to install, instead of an InterpreterError from the kernel."""
    import numpy
    from triton.runtime.errors import InterpreterError

    from vllm_int4kv.kernels import interpreter

    class FailsLikeNumpy24:
        def __getitem__(self, grid):
            def launch(*args):
                raise InterpreterError(repr(TypeError("only 0-dimensional arrays can be converted")))
            return launch

    case = make_case(**DECODE)
    assert interpreter.interpreter_problem() is None  # this environment: every kernel test runs
    monkeypatch.setattr(interpreter, "_count_to_loaded_bound", FailsLikeNumpy24())
    try:
        for numpy_version, advice in (("2.4.6", True), ("2.3.5", False)):  # NumPy is blamed only from 2.4
            monkeypatch.setattr(numpy, "__version__", numpy_version)
            interpreter.interpreter_problem.cache_clear()
            with pytest.raises(RuntimeError, match="cannot run a loop with a run-time bound") as raised:
                run_kernel(case)
            assert ("pip install 'numpy<2.4'" in str(raised.value)) == advice, str(raised.value)
    finally:
        interpreter.interpreter_problem.cache_clear()


def test_gpu_tile_choices_run_here_too(monkeypatch):
    """On a GPU, fp32 queries get 16-token tiles and 16 prefill rows (ptxas spills at the 16-bit sizes);
    the CPU normally keeps the larger tiles, so run the GPU choices under the interpreter as well."""
    monkeypatch.setattr(attention, "_is_gpu", lambda device: True)
    for kw in (dict(num_kv_heads=2, group=4), dict(num_kv_heads=1, group=7, head_dim=128),
               dict(num_kv_heads=1, group=8, head_dim=256)):
        case = make_case(**MIXED, **kw)
        assert error_ratio(run_kernel(case), run_reference(case)) < 1e-6, kw
    case = make_case(**DECODE)  # num_splits given: choosing it would ask the (absent) GPU for its SMs
    assert error_ratio(run_kernel(case, num_splits=4), run_reference(case)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (8, 4)])
def test_16bit_queries_on_gpu(shape, dtype, k_bits, v_bits):
    """The GPU-only code: decode turns 4-bit codes into floats with inline PTX (``_nibble_values``)
    and bf16 codes by OR-ing them into 128.0; the interpreter runs neither."""
    case = make_case(**shape, dtype=dtype, k_bits=k_bits, v_bits=v_bits)
    for name in ("cache", "query", "block_table", "seq_lens", "query_start_loc"):
        setattr(case, name, getattr(case, name).cuda())
    out = run_kernel(case)
    ref = paged_attention_reference(case.query.cpu(), case.cache.cpu(), case.layout,
                                    case.block_table.cpu(), case.seq_lens.cpu(),
                                    case.query_start_loc.cpu())
    assert error_ratio(out.float().cpu(), ref) < 1e-2


@pytest.mark.parametrize("dtype,bits,fold", [(torch.bfloat16, 4, True), (torch.bfloat16, 4, False),
                                            (torch.float16, 4, True), (torch.float16, 8, True),
                                            (torch.float16, 4, False), (torch.float16, 8, False)])
def test_codes_become_floats_by_or_ing_them_into_the_bias(dtype, bits, fold):
    """The kernel turns a code into ``bias + code`` in the dot's dtype with one OR (no int->float
    conversion) and folds ``-bias * scale`` into the zero point: the constant must hold every code exactly.
    fp16 tiles dequantized value by value take 256.0, whose last bit is 1/4: ``256 + code / 4``.
    """
    from vllm_int4kv.kernels.tile_loads import BF16_128, FP16_256, FP16_1024

    bias = attention.code_bias(bits, dtype, fold)
    pattern = {128: BF16_128, 256: FP16_256, 1024: FP16_1024}[bias].value
    assert torch.tensor(pattern, dtype=torch.int16).view(dtype).item() == bias
    codes = torch.arange(2 ** bits, dtype=torch.int16)
    unit = 0.25 if bias == 256 else 1.0
    assert torch.equal((codes | pattern).view(dtype).double(), bias + unit * codes.double())
    assert attention.code_bias(8, torch.bfloat16) == 0  # 128 + 255 needs 9 significant bits: converted
    assert attention.code_bias(4, torch.float32) == 0  # exact fp32 dot: converted


def _fp32(bits: int) -> torch.Tensor:
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)


def _bf16_bits(fp32_bits: int) -> int:
    return int(_fp32(fp32_bits).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """A slow, obvious emulator of the few 32-bit PTX instructions our inline asm uses.

    ``prmt.b32 d, a, b, sel`` (default mode): result byte i is byte ``sel >> 4i & 7`` of the 8 bytes
    ``b:a`` (a = bytes 0-3), sign-replicated if bit 3 of that nibble is set (PTX ISA, prmt).
    """
    regs = dict(inputs)

    def value(operand: str) -> int:
        return int(operand, 0) if operand[0].isdigit() else regs[operand]

    for line in asm.replace("{", "").replace("}", "").split(";"):
        words = line.replace(",", " ").split()
        if not words or words[0] == ".reg":
            continue
        op, dest, *src = words
        if op == "and.b32":
            regs[dest] = value(src[0]) & value(src[1])
        elif op == "mov.b32":
            regs[dest] = value(src[0])
        elif op == "shr.u32":
            regs[dest] = value(src[0]) >> value(src[1])
        elif op == "shl.b32":
            regs[dest] = value(src[0]) << value(src[1]) & 0xFFFFFFFF
        elif op == "cvt.rn.bf16x2.f32":  # d = bf16(a) in the high half, bf16(b) in the low, to nearest even
            regs[dest] = _bf16_bits(value(src[0])) << 16 | _bf16_bits(value(src[1]))
        elif op == "prmt.b32":
            pool = value(src[0]) | value(src[1]) << 32
            selector, out = value(src[2]), 0
            for i in range(4):
                nibble = selector >> 4 * i & 0xF
                byte = pool >> 8 * (nibble & 7) & 0xFF
                if nibble & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << 8 * i
            regs[dest] = out
        else:
            raise AssertionError(f"the emulator does not know {op!r}: extend it with the new instruction")
    return regs


@pytest.mark.parametrize("dtype,fold", [(torch.bfloat16, True), (torch.float16, True), (torch.float16, False)],
                         ids=["bf16", "fp16", "fp16_quarters"])
def test_ptx_nibble_unpack_gives_bias_plus_code(dtype, fold):
    """``_nibble_values`` (GPU only) against its definition, for every byte in every position.

    Triton passes the 4 bytes of one call in ``$4`` (element i = byte i) and reads each output's elements
    i from register ``$(2k + i // 2)``, lane ``i % 2`` (seen in the PTX it generates).
    """
    from vllm_int4kv.kernels import tile_loads as ak

    bias = attention.code_bias(4, dtype, fold)
    asm = {128: ak.NIBBLES_TO_BF16_PTX, 1024: ak.NIBBLES_TO_FP16_PTX,
           256: ak.NIBBLES_TO_FP16_QUARTERS_PTX}[bias].value
    unit = 0.25 if bias == 256 else 1.0
    for first in range(0, 256, 4):
        packed = [first, first + 1, first + 2, (first * 7 + 3) % 256]
        out = _run_ptx(asm, {"$4": int.from_bytes(bytes(packed), "little")})
        lanes = torch.tensor([out[f"${r}"] >> 16 * lane & 0xFFFF for r in range(4) for lane in (0, 1)],
                             dtype=torch.int32).to(torch.int16).view(dtype).double()
        low = torch.tensor([b & 0xF for b in packed], dtype=torch.float64)
        high = torch.tensor([b >> 4 for b in packed], dtype=torch.float64)
        assert torch.equal(lanes[:4], bias + unit * low), (packed, lanes)
        assert torch.equal(lanes[4:], bias + unit * high), (packed, lanes)


def test_ptx_rounding_to_bf16_gives_the_rounded_pair_and_its_fp32_values():
    """``_rounded_for_dot``'s asm (GPU only; bf16 decode's folded V): two fp32 in ``$3``/``$4`` (elements
    0, 1) -> the pair as packed bf16 in ``$0`` (element 0 in the low half) and each rounded value back in
    fp32 in ``$1``/``$2``, exactly what torch's bf16 rounding (to nearest even) gives."""
    from vllm_int4kv.kernels import tile_loads as ak

    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(64, generator=gen) * 10.0 ** torch.randint(-8, 8, (64,), generator=gen),
                        torch.tensor([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3e38, -1e-40])])
    bits = values.view(torch.int32).long() & 0xFFFFFFFF
    for a, b in zip(bits[0::2].tolist(), bits[1::2].tolist()):
        out = _run_ptx(ak.ROUND_TO_BF16_PTX.value, {"$3": a, "$4": b})
        rounded = _fp32(a).to(torch.bfloat16), _fp32(b).to(torch.bfloat16)
        packed = torch.tensor([out["$0"] & 0xFFFF, out["$0"] >> 16]).to(torch.int16).view(torch.bfloat16)
        assert torch.equal(packed.view(torch.int16), torch.cat(rounded).view(torch.int16)), (a, b)
        assert torch.equal(_fp32(out["$1"]), rounded[0].float()) and torch.equal(_fp32(out["$2"]), rounded[1].float())


def test_ptx_copy_changes_no_bit():
    """``_once_per_program``'s asm (GPU only) must return its two 16-bit values exactly as they came."""
    from vllm_int4kv.kernels import tile_loads as ak

    for word in (0, 0x43004F0F, 0xFFFF8000, 0x12345678):
        assert _run_ptx(ak.COPY_PTX.value, {"$1": word})["$0"] == word


def test_tiles_are_shared_through_shared_memory_only_where_it_pays(monkeypatch):
    """On NVIDIA GPUs quantized tiles always go to the dot through shared memory, 16-bit planes only in
    prefill (decode loads them into the dot as they are); never for fp32 queries, or on CPU, where
    asking for it is an error."""
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    assert not attention.shares_tiles_by_default(4, True, bf16)  # CPU: the interpreter runs no PTX
    case = make_case(**DECODE)
    with pytest.raises(ValueError, match="share_tiles=True needs an NVIDIA GPU"):
        run_kernel(case, share_tiles=True)
    assert error_ratio(run_kernel(case, share_tiles=False), run_reference(case)) < 1e-6
    monkeypatch.setattr(attention, "_is_gpu", lambda device: True)
    assert attention.shares_tiles_by_default(4, True, bf16) and attention.shares_tiles_by_default(8, False, bf16)
    assert attention.shares_tiles_by_default(16, False, bf16)
    assert not attention.shares_tiles_by_default(16, True, bf16)
    assert attention.shares_tiles_by_default(4, True, torch.empty(1, dtype=torch.float16))
    assert not attention.shares_tiles_by_default(4, False, torch.empty(1, dtype=torch.float32))
