"""Plan KV-cache capacity and decode traffic for a model under each KV policy.

For every policy the planner reports, per tensor-parallel rank: bytes per token (all layers, K + V +
scale/zero parameters, from ``PageLayout``), KV memory per sequence, the longest context and the number of
sequences that fit in the KV budget, the KV bytes one decode step reads from HBM, the KV positions and bytes
read while generating G tokens after a cached context C0, and the decode-attention time those bytes take
at a given bandwidth. It is plain arithmetic (no vLLM, no GPU) so anyone can check it:

    bytes/token        = sum over layers of kv_heads_per_rank * slot_bytes (K16V16's in kept layers)
    KV per sequence    = sum over layers of kv_heads_per_rank * slot_bytes * round_up(min(C, W_layer), block)
    read per step      = batch * sum over layers of kv_heads_per_rank * slot_bytes * min(C, W_layer)
    positions over G   = G*C0 + G*(G-1)/2   (step t reads the C0 + t cached positions; per full layer)

A sliding-window layer (window W) never holds or reads more than W positions. Block rounding follows vLLM:
each sequence owns whole blocks of ``block_size`` tokens in every layer. Layers kept unquantized
(``--kv-cache-dtype-skip-layers``) cost K16V16's slot bytes; where vLLM pads pages (models that mix layer
types, see the README) the real cache holds fewer tokens than planned here.
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..kernels.page_format import HEAD_DIMS, HEAD_DIMS_TEXT
from ..policy.layer_map import PolicyMap, parse_policy_map
from ..policy.layout import UNQUANTIZED, KVPolicy

GIB = 1 << 30
DEFAULT_POLICIES = ("k16v16", "k8v4", "k4v4")
DATASHEET_GBS = 3350.0  # H100 SXM HBM3 peak, NVIDIA datasheet
DATASHEET_LABEL = "datasheet H100 SXM 3.35 TB/s (no measured copy bandwidth found)"
_REPO_RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
_ELEM_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4}
# Families whose configs leave the sliding/global interleave implicit: layer i slides unless (i+1) % N == 0.
_DEFAULT_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6, "cohere2": 4, "gpt_oss": 2}


class UnsupportedModel(ValueError):
    """The model's attention cannot be served by the int4kv backend (e.g. MLA)."""


# -- the model, reduced to what the KV cache sees ---------------------------------------------------

@dataclass(frozen=True)
class ModelKV:
    """KV geometry of a decoder as served. ``windows[i]`` is layer i's sliding window, None for full
    attention; ``kept`` are the layers ``--kv-cache-dtype-skip-layers`` keeps at K16V16."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    windows: tuple = ()
    elem_bytes: int = 2
    weights_bytes: int | None = None
    name: str = "model"
    kept: tuple = ()

    def __post_init__(self):
        if min(self.num_layers, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError("num_layers, num_kv_heads and head_dim must be positive")
        windows = tuple(self.windows) or (None,) * self.num_layers
        if len(windows) != self.num_layers:
            raise ValueError(f"{len(windows)} layer window entries for {self.num_layers} layers")
        if any(w is not None and w < 1 for w in windows):
            raise ValueError("sliding windows must be positive")
        object.__setattr__(self, "windows", windows)
        if any(not 0 <= i < self.num_layers for i in self.kept):
            raise ValueError(f"kept layers {sorted(self.kept)} must lie in 0..{self.num_layers - 1}")
        object.__setattr__(self, "kept", tuple(sorted(set(self.kept))))

    @property
    def num_sliding(self) -> int:
        return sum(w is not None for w in self.windows)

    def kv_heads_per_rank(self, tp: int) -> int:
        """vLLM's split: heads divide across ranks, or each rank holds one replicated head when tp > heads."""
        heads = self.num_kv_heads
        if tp < 1 or (heads % tp if tp <= heads else tp % heads):
            raise ValueError(f"tensor parallel size {tp} must divide or be a multiple of {heads} KV heads")
        return max(1, heads // tp)


def load_config(path: str | os.PathLike) -> dict:
    """config.json of a local Hugging Face folder (or the file itself); multimodal text_config merged in."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path} (pass a local model folder or config values)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON config ({exc}); pass a local model folder holding "
                         "config.json, or its config.json") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds no config object; pass a model folder's config.json")
    text = cfg.get("text_config") or {}
    return {**cfg, **text, "model_type": text.get("model_type", cfg.get("model_type"))}


def layer_windows(cfg: dict) -> tuple:
    """Per-layer sliding window (None = global) following the transformers config classes' rules."""
    n, window = cfg["num_hidden_layers"], cfg.get("sliding_window") or None
    if cfg.get("layer_types"):
        return tuple(_window_of(kind, cfg) for kind in cfg["layer_types"])
    if "use_sliding_window" in cfg:  # Qwen2 family: only layers from max_window_layers on slide
        if not cfg["use_sliding_window"] or window is None:
            return (None,) * n
        first = cfg.get("max_window_layers", n)
        if cfg.get("model_type") == "qwen2_moe":
            return tuple(window if i % 2 == 0 and i < first else None for i in range(n))
        return tuple(window if i >= first else None for i in range(n))
    if window is None:
        return (None,) * n
    pattern = (cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
               or _DEFAULT_PATTERN.get(cfg.get("model_type")))
    if pattern:  # Gemma-2/3, Cohere2: every pattern-th layer is global
        return tuple(window if (i + 1) % int(pattern) else None for i in range(n))
    return (window,) * n  # Mistral, Phi-3: one window for every layer


def _window_of(kind: str, cfg: dict) -> int | None:
    if kind == "full_attention":
        return None
    if kind == "sliding_attention":
        return cfg["sliding_window"]
    if kind == "chunked_attention":  # Llama-4 local layers never attend past their chunk
        return cfg["attention_chunk_size"]
    raise UnsupportedModel(f"layer type {kind!r} has no paged KV cache the int4kv backend can serve")


def model_from_config(cfg: dict, name: str = "model", elem_bytes: int | None = None) -> ModelKV:
    """Reduce a Hugging Face config dict to its KV geometry; refuses MLA models."""
    if cfg.get("kv_lora_rank"):
        raise UnsupportedModel(
            f"{name} uses multi-head latent attention (MLA, kv_lora_rank={cfg['kv_lora_rank']}): it caches "
            "one compressed latent per token, not per-head K/V, and is not supported by the int4kv backend")
    missing = [k for k in ("num_hidden_layers", "num_attention_heads") if not cfg.get(k)]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}; pass them on the command line")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads  # absent key = plain multi-head attention
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if cfg.get("hidden_size") else None)
    if not head_dim:
        raise ValueError("config gives neither head_dim nor hidden_size; pass --head-dim")
    if elem_bytes is None:  # as vLLM's --dtype auto: the checkpoint's 16-bit dtype, fp32 served in bf16
        elem_bytes = 2
    return ModelKV(cfg["num_hidden_layers"], kv_heads, head_dim, layer_windows(cfg), elem_bytes,
                   weights_from_config(cfg, head_dim, elem_bytes), name)


def weights_from_config(cfg: dict, head_dim: int, elem_bytes: int) -> int | None:
    """Bytes of a dense, unquantized decoder's weights (biases ignored); None if unknowable."""
    keys = ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers", "num_attention_heads")
    moe = any(cfg.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    if moe or cfg.get("quantization_config") or not all(cfg.get(k) for k in keys):
        return None
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v projections
    mlp = 3 * hidden * cfg["intermediate_size"]  # gate, up, down
    norms = 2 * hidden
    embeddings = cfg["vocab_size"] * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return (cfg["num_hidden_layers"] * (attention + mlp + norms) + embeddings + hidden) * elem_bytes


# -- the arithmetic ----------------------------------------------------------------------------------

def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def positions_read(c0: int, gen: int, window: int | None = None) -> int:
    """KV positions one layer reads over ``gen`` decode steps after ``c0`` cached tokens (step t: c0 + t)."""
    if window is None:
        return gen * c0 + gen * (gen - 1) // 2
    growing = min(max(window - c0, 0), gen)  # steps before the window is full
    return growing * c0 + growing * (growing - 1) // 2 + (gen - growing) * window


def as_map(policy) -> PolicyMap:
    """A map from a ``PolicyMap``, a ``KVPolicy`` or their text."""
    if isinstance(policy, PolicyMap):
        return policy
    return PolicyMap.uniform(policy) if isinstance(policy, KVPolicy) else parse_policy_map(policy)


def _layer_token_bytes(model: ModelKV, policy, tp: int) -> list[int]:
    """Bytes one token costs in each layer on one rank: each layer at its layout (K16V16 in the kept
    layers). Pages are taken unpadded: on a model that mixes layer types vLLM pads some of them, in ways
    that differ between its CPU and GPU platforms (docs/policy.md), and the cache then holds fewer tokens."""
    if model.head_dim not in HEAD_DIMS:
        raise UnsupportedModel(f"head_dim {model.head_dim} is not supported by the int4kv backend "
                               f"(it must be {HEAD_DIMS_TEXT})")
    policy_map, heads = as_map(policy), model.kv_heads_per_rank(tp)
    layouts = [UNQUANTIZED if i in model.kept else policy_map.for_layer(i) for i in range(model.num_layers)]
    return [heads * layout.slot_bytes(model.head_dim, model.elem_bytes) for layout in layouts]


def sequence_bytes(model: ModelKV, policy, context: int, block_size: int = 16,
                   tp: int = 1) -> int:
    """KV bytes one sequence of ``context`` tokens holds on one rank, in whole blocks per layer."""
    return sum(b * round_up(min(context, w or context), block_size)
               for b, w in zip(_layer_token_bytes(model, policy, tp), model.windows))


def max_context(model: ModelKV, policy, budget: int, block_size: int = 16,
                tp: int = 1) -> int | None:
    """Longest single-sequence context whose blocks fit in ``budget`` bytes; None if every layer slides
    and even a full window fits (the sequence can then grow without bound)."""
    def fits(blocks: int) -> bool:
        return sequence_bytes(model, policy, blocks * block_size, block_size, tp) <= budget

    largest_window = max((w for w in model.windows if w), default=0)
    if model.num_sliding == model.num_layers and fits(-(-largest_window // block_size)):
        return None
    lo, hi = 0, budget // (min(_layer_token_bytes(model, policy, tp)) * block_size) + 1
    while lo < hi:  # largest block count that fits; memory grows monotonically with context
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * block_size


@dataclass
class PolicyPlan:
    """One policy's numbers; every byte count is per tensor-parallel rank."""

    policy: str
    bytes_per_token: int
    bytes_per_token_per_layer: float  # the mean over layers (an integer unless some are kept unquantized)
    seq_bytes: int
    max_tokens: int | None
    max_seqs: int
    capacity_vs_bf16: float
    step_read_bytes: int
    gen_positions: int
    gen_read_bytes: int
    step_time_s: float
    gen_time_s: float


@dataclass
class PlanInputs:
    context: int = 8192
    batch: int = 1
    gen_tokens: int = 1024
    kv_budget_bytes: int = 40 * GIB
    bandwidth_gbs: float = DATASHEET_GBS
    block_size: int = 16
    tp: int = 1


def plan(model: ModelKV, policies, inputs: PlanInputs) -> list[PolicyPlan]:
    """Numbers for each policy or per-layer map (``PolicyMap``, ``KVPolicy`` or their text)."""
    policies = [as_map(p) for p in policies]
    for policy in policies:
        policy.check_layers(range(model.num_layers))
        if model.head_dim in HEAD_DIMS:  # (else _layer_token_bytes refuses the model itself)
            policy.check_head_dim(model.head_dim, model.elem_bytes)
    return [_plan_one(model, p, inputs) for p in policies]


def _plan_one(model: ModelKV, policy: PolicyMap, x: PlanInputs) -> PolicyPlan:
    layer_bytes = _layer_token_bytes(model, policy, x.tp)
    per_token = sum(layer_bytes)
    mean = per_token / model.num_layers
    seq = sequence_bytes(model, policy, x.context, x.block_size, x.tp)
    step = x.batch * sum(b * min(x.context, w or x.context) for b, w in zip(layer_bytes, model.windows))
    gen = x.batch * sum(b * positions_read(x.context, x.gen_tokens, w)
                        for b, w in zip(layer_bytes, model.windows))
    bandwidth = x.bandwidth_gbs * 1e9
    bf16_per_token = model.num_layers * model.kv_heads_per_rank(x.tp) * 2 * model.head_dim * 2
    return PolicyPlan(
        policy=policy.name, bytes_per_token=per_token,
        bytes_per_token_per_layer=int(mean) if mean.is_integer() else round(mean, 1),
        seq_bytes=seq, max_tokens=max_context(model, policy, x.kv_budget_bytes, x.block_size, x.tp),
        max_seqs=x.kv_budget_bytes // seq, capacity_vs_bf16=bf16_per_token / per_token,
        step_read_bytes=step, gen_positions=positions_read(x.context, x.gen_tokens), gen_read_bytes=gen,
        step_time_s=step / bandwidth, gen_time_s=gen / bandwidth)


def startup_summary(num_layers: int, num_kv_heads: int, head_dim: int, policy,
                    elem_bytes: int = 2) -> dict:
    """What the backend's start-up line reports: KV bytes per token (per layer and all layers, for the
    KV heads given, i.e. per rank) and how many more tokens fit than in a BF16 cache."""
    policy = policy if isinstance(policy, KVPolicy) else as_map(policy).single
    per_layer = num_kv_heads * policy.slot_bytes(head_dim, elem_bytes)
    bf16_per_layer = num_kv_heads * 2 * head_dim * 2
    gain = bf16_per_layer / per_layer
    return {
        "policy": policy.name,
        "bytes_per_token_per_layer": per_layer,
        "bytes_per_token": per_layer * num_layers,
        "bf16_bytes_per_token": bf16_per_layer * num_layers,
        "capacity_gain_vs_bf16": gain,
        "text": (f"KV cache {policy.name}: {per_layer} B/token/layer, {per_layer * num_layers} B/token "
                 f"over {num_layers} layers ({gain:.2f}x the tokens of BF16)"),
    }


def measured_bandwidth(dirs=None) -> tuple[float, str]:
    """Copy bandwidth (GB/s) from the newest benchmark results JSON that has a usable
    ``copy_bandwidth_gbs``, else the H100 SXM datasheet figure; with a label saying which."""
    dirs = dirs or [Path("benchmarks/results"), _REPO_RESULTS]
    files = {os.path.realpath(f) for d in dirs for f in glob.glob(os.path.join(d, "*.json"))}
    for path in sorted(files, key=os.path.getmtime, reverse=True):
        try:
            with open(path) as f:
                value = json.load(f).get("copy_bandwidth_gbs")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
            return float(value), f"measured copy bandwidth {value:.0f} GB/s ({os.path.relpath(path)})"
    return DATASHEET_GBS, DATASHEET_LABEL


# -- presentation ------------------------------------------------------------------------------------
