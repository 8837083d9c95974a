"""Checks of the index tensors that steer the kernels' memory accesses: block tables, lengths, slots.

The kernels trust them: a block id past the cache (or negative) is read or written like any other, so a
bad id changes the output silently or, under the interpreter, crashes the process. Their values live on
the device, so checking them costs a copy to the host, a sync the GPU hot path cannot afford (and CUDA
graph capture forbids). So they are checked

- always on the CPU (the interpreter and the torch path: ~20 small NumPy ops per call);
- on a GPU when asked: ``validate_blocks=True`` in a launcher, or ``VLLM_INT4KV_CHECK_BLOCKS=1`` in the
  environment for launchers called with the default (a debug switch: it syncs every call, so serve with
  ``enforce_eager``).

Failures raise ValueError naming the sequence and the entry.
"""
from __future__ import annotations

import os

import numpy as np
import torch

CHECK_BLOCKS_ENV = "VLLM_INT4KV_CHECK_BLOCKS"


def checks_blocks(device: torch.device, validate_blocks: bool | None) -> bool:
    """Whether a launcher checks the index tensors' values: the caller's choice, else always off a GPU and
    on one only with ``VLLM_INT4KV_CHECK_BLOCKS`` set (to anything but ``0``)."""
    if validate_blocks is not None:
        return validate_blocks
    return device.type != "cuda" or os.environ.get(CHECK_BLOCKS_ENV, "0").strip() not in ("", "0")


def check_index_tensors(block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        device: torch.device, block_size: int, max_seq_len: int | None = None) -> None:
    """What the host sees without a sync: dtypes, devices, shapes, strides; and, given the host's
    ``max_seq_len``, that the block table has a column for each of its blocks."""
    for name, t, dims in (("block_table", block_table, 2), ("seq_lens", seq_lens, 1),
                          ("query_start_loc", query_start_loc, 1)):
        if t.dtype not in (torch.int32, torch.int64) or t.device != device:
            raise TypeError(f"{name} must be an int32/int64 tensor on {device}, got {t.dtype} on {t.device}")
        if t.dim() != dims or t.stride(-1) != 1:
            raise ValueError(f"{name} must be {dims}-D with contiguous {'rows' if dims == 2 else 'entries'}, "
                             f"got shape {tuple(t.shape)} strides {t.stride()}")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or block_table.shape[0] < seq_lens.shape[0]:
        raise ValueError("need len(query_start_loc) == num_seqs + 1 and a block_table row per sequence")
    if max_seq_len is not None and -(-max_seq_len // block_size) > block_table.shape[1]:
        raise ValueError(f"max_seq_len {max_seq_len} needs {-(-max_seq_len // block_size)} blocks of "
                         f"{block_size}; block_table has {block_table.shape[1]} columns")


def check_block_table(block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *,
                      num_blocks: int, block_size: int, num_tokens: int, max_query_len: int | None = None,
                      sliding_window: int | None = None) -> None:
    """Sequence ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s+1]`` (within ``num_tokens``),
    the last of its ``seq_lens[s]`` tokens; every block it reads must be a block of the cache.

    A sequence with query rows reads the entries of ``block_table[s]`` that hold its tokens, all of them
    but those wholly before every row's ``sliding_window`` (vLLM may leave any id there); one without
    reads none. (In NumPy: as many small torch ops cost ~10x more.)
    """
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        return
    lens = _host(seq_lens)
    starts = _host(query_start_loc[:num_seqs + 1])
    q_lens = np.diff(starts)
    if starts[0] < 0 or starts[-1] > num_tokens:
        raise ValueError(f"query_start_loc runs from {starts[0]} to {starts[-1]}, outside the {num_tokens} "
                         "query tokens")
    _first_bad(q_lens < 0, lambda s: f"query_start_loc falls at sequence {s}: {starts[s]} to {starts[s + 1]}")
    _first_bad(q_lens > lens,
               lambda s: f"sequence {s} has {q_lens[s]} query tokens but seq_lens[{s}] = {lens[s]}")
    if max_query_len is not None and q_lens.max() > max_query_len:
        s = int(q_lens.argmax())
        raise ValueError(f"sequence {s} has {q_lens[s]} query tokens, more than max_query_len "
                         f"{max_query_len}")
    ends = (lens + (block_size - 1)) // block_size * (q_lens > 0)  # the entries read: [first, end)
    columns = block_table.shape[1]
    _first_bad(ends > columns, lambda s: f"sequence {s} has {lens[s]} tokens, {ends[s]} blocks of "
                                         f"{block_size}; block_table has {columns} columns")
    entry = np.arange(columns)
    read = entry < ends[:, None]
    if sliding_window:
        read &= entry >= np.maximum(lens - q_lens - sliding_window + 1, 0)[:, None] // block_size
    table = _host(block_table[:num_seqs])
    bad = read & ((table < 0) | (table >= num_blocks))
    if bad.any():
        s, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{s}, {j}] = {table[s, j]} is not a block of the cache "
                         f"(0 <= id < {num_blocks}): sequence {s} reads it for its tokens "
                         f"{j * block_size} to {min(lens[s], (j + 1) * block_size) - 1}")


def check_slots(slot_mapping: torch.Tensor, num_tokens: int, num_blocks: int, block_size: int) -> None:
    """Every slot a token is written to is in the cache (negative slots mark padding: not written)."""
    slots = _host(slot_mapping[:num_tokens])
    _first_bad(slots >= num_blocks * block_size,
               lambda t: f"slot_mapping[{t}] = {slots[t]} is past the cache's {num_blocks * block_size} "
                         f"slots ({num_blocks} blocks of {block_size})")


def _host(t: torch.Tensor) -> np.ndarray:
    """An index tensor in NumPy (a view on CPU; from a GPU a copy: the sync the hot path avoids)."""
    return t.detach().cpu().numpy()


def _first_bad(bad: np.ndarray, message) -> None:
    if bad.any():
        raise ValueError(message(int(np.flatnonzero(bad)[0])))
