"""Measure what each K/V precision policy does to a model's next-token distributions.

The model runs in HF transformers with an attention function of our own (registered through
``AttentionInterface``) that passes K and V — after RoPE, ``[B, Hkv, S, D]`` — through
``reference.fake_quantize_kv`` before ordinary SDPA, so every number here is what the paged cache would
store and return. One full-precision pass per prompt gives the reference log-probabilities; each
candidate then costs one more pass per prompt.

The error metric, used both for the quality budget and for the INT6/INT8 ratio classifier:

    err(policy) = mean over every position t of every prompt of KL(p_fp(. | x<=t) || p_q(. | x<=t)), nats

Why KL and not a raw logit distance: the softmax ignores a common shift of the logits; KL weighs each
vocabulary entry by how likely it is (an unweighted logit MSE is dominated by tens of thousands of
irrelevant tail entries); and KL is what perplexity pays: if the text were drawn from the model itself,
E[NLL_q - NLL_fp] = E[KL(p_fp || p_q)] exactly, so ``exp(err) - 1`` estimates the perplexity increase
(on real text the two track each other; the CLI reports both). KL is quadratic in a small logit error,
so for the ratio classifier ``err(K6V4) / err(K8V4)`` runs from ~1 (value noise dominates: keys
tolerant) to ~16 (key noise dominates: the INT6 step is 4x the INT8 step).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .placement import (SPREAD, check_fits, compute_dtype, explained_out_of_memory, pick_device,
                                 placement)
from .corpus import calibration_prompts
from ..kernels.reference import fake_quantize_kv
from .layout import KVPolicy

ATTN_NAME = "int4kv_calibration"
DEFAULT_KL_BUDGET = 0.01  # nats; exp(0.01) - 1 = 1.0 % perplexity if the text follows the model
DEFAULT_TAU = 3.0  # published threshold of the INT6/INT8 ratio classifier
DEFAULT_PROMPTS = 5
DEFAULT_MAX_TOKENS = 512
PROMPT_MIN_CHARS = 2400
K4_GROUPS = (32, 16)  # key channel groups tried at 4 bits (each adds 4 B per group per token and head)


def candidate_policies(head_dim: int, elem_bytes: int = 2) -> list[KVPolicy]:
    """Every layout auto may choose, cheapest first in bytes per token for this head dim.

    Equal sizes keep the listed order: plain before rotated (rotation costs a little compute).
    """
    k4 = [KVPolicy(4, 4), KVPolicy(4, 4, rotate=True)]
    for group in K4_GROUPS:
        if group < head_dim and head_dim % group == 0:
            k4 += [KVPolicy(4, 4, group), KVPolicy(4, 4, group, rotate=True)]
    wider = [KVPolicy(8, 4), KVPolicy(8, 4, rotate=True), KVPolicy(16, 4), KVPolicy(8, 8), KVPolicy(16, 16)]
    return sorted(k4 + wider, key=lambda p: p.slot_bytes(head_dim, elem_bytes))


@dataclass(frozen=True)
class Settings:
    """Everything that changes a decision besides the model; all of it goes into the cache key."""

    budget: float = DEFAULT_KL_BUDGET
    tau: float = DEFAULT_TAU
    n_prompts: int = DEFAULT_PROMPTS
    max_tokens: int = DEFAULT_MAX_TOKENS
    # ratio > tau skips the K4 candidates. Off: it is not shown safe (rotation and channel groups can
    # rescue keys the plain INT6/INT8 ratio calls fragile), and the K4 passes are cheap.
    ratio_early_exit: bool = False

    def __post_init__(self):
        if not self.budget > 0:
            raise ValueError(f"the KL budget must be > 0 nats, got {self.budget}")
        if self.n_prompts < 1 or self.max_tokens < 2:
            raise ValueError("need at least one prompt of at least two tokens")


@dataclass
class Measurement:
    """Mean next-token KL vs full precision, top-1 agreement and the NLL change on the prompt text."""

    name: str
    bytes_per_token: int | None
    kl: float
    top1: float
    dnll: float
    exact: bool = False  # not run: the layout stores K and V unchanged (KL is 0 by construction)

    @property
    def ppl_delta(self) -> float:
        """Perplexity increase estimated from the KL, as a fraction."""
        return math.expm1(self.kl)


@dataclass
class Calibration:
    """The outcome: the chosen policy, every measurement taken and the classifier evidence."""

    policy: KVPolicy
    measurements: list[Measurement]
    ratio: float
    settings: Settings
    seconds: float  # model load + reference pass + candidates
    info: dict = field(default_factory=dict)

    def measured(self, name: str) -> Measurement | None:
        return next((m for m in self.measurements if m.name == name), None)

    @property
    def fragile(self) -> bool:
        return self.ratio > self.settings.tau

    def evidence(self) -> dict:
        err = {n: self.measured(n).kl for n in ("k8v4", "k6v4", "k4v4") if self.measured(n)}
        return {
            "metric": "mean next-token KL(p_fp || p_quant), nats, over all positions of the prompts",
            "decision": self.policy.name,
            "budget": self.settings.budget,
            "tau": self.settings.tau,
            "err_int8": err.get("k8v4"), "err_int6": err.get("k6v4"), "err_k4v4": err.get("k4v4"),
            "ratio": self.ratio,
            "keys": "fragile" if self.fragile else "tolerant",
            "candidates": [asdict(m) for m in self.measurements],
            "seconds": round(self.seconds, 2),
            "settings": asdict(self.settings),
            **self.info,
        }


# -- prompts -----------------------------------------------------------------------------------------
def load_prompts(n: int = DEFAULT_PROMPTS) -> list[str]:
    """Calibration text shipped with the package: whole paragraphs of public-domain addresses, long
    enough to fill max_tokens for common tokenizers (~4.5 characters per token)."""
    return list(calibration_prompts(n=n, min_chars=PROMPT_MIN_CHARS))


def prompt_token_ids(model: str, prompts: list[str], max_tokens: int, *, revision=None,
                     trust_remote_code=False) -> list[list[int]]:
    """Each prompt tokenized as the model would see it (BOS where the tokenizer adds one), truncated."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    ids = [tokenizer(p)["input_ids"][:max_tokens] for p in prompts]
    return [x for x in ids if len(x) >= 2]


def text_chunks(model: str, path: str, n: int, size: int = 512, *, revision=None,
                trust_remote_code=False) -> list[list[int]]:
    """The first ``n`` whole ``size``-token chunks of a held-out text file, tokenized for ``model``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    with open(path, encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"]
    chunks = [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)][:n]
    if not chunks:
        raise ValueError(f"{path} holds fewer than {size} tokens")
    return chunks


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()


# -- the quantizing attention function --------------------------------------------------------------
# (k_bits, v_bits, k_group, rotate), a function (key, value) -> (key, value) for another cache format
# (benchmarks/vllm_formats.py: vLLM's own), None for full precision, or a PerLayer of those
_ACTIVE: "tuple | Callable | PerLayer | None" = None
_calls = 0  # how many attention layers ran through _quantizing_attention (see Session)
_layers_seen: set[int] = set()  # the layer_idx of every attention module that ran through it


@dataclass(frozen=True)
class PerLayer:
    """A cache format per layer: ``overrides`` (HF ``layer_idx`` -> spec, None = full precision), else
    ``default``. HF's layer index is the one ``--kv-cache-dtype-skip-layers`` names in vLLM."""

    default: tuple | Callable | None
    overrides: dict[int, tuple | Callable | None]

    def for_layer(self, module) -> tuple | Callable | None:
        index = getattr(module, "layer_idx", None)
        if index is None:
            raise NotImplementedError(f"{type(module).__name__} has no layer_idx, so its layers cannot be "
                                      "measured one by one")
        return self.overrides.get(index, self.default)


def _quantizing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    global _calls
    _calls += 1
    if getattr(module, "layer_idx", None) is not None:
        _layers_seen.add(module.layer_idx)
    spec = _ACTIVE.for_layer(module) if isinstance(_ACTIVE, PerLayer) else _ACTIVE
    if callable(spec):
        key, value = spec(key, value)
    elif spec is not None:
        k_bits, v_bits, k_group, rotate = spec
        d = key.shape[-1]
        key, value = fake_quantize_kv(key, value, k_bits, v_bits, min(k_group or d, d), d, rotate)
    if kwargs.get("s_aux") is not None or kwargs.get("softcap"):
        return _eager_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention sinks (gpt-oss, ``s_aux``) and logit soft-capping (Gemma 2, ``softcap``) have no place in
    SDPA, which would drop them silently: run the model's own eager attention, with the boolean mask
    (``sdpa_mask``) made additive as it expects. ``sdpa_mask`` returns None where plain causal attention
    needs no mask (SDPA's ``is_causal``)."""
    import importlib

    eager = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} passes attention sinks or a soft-cap but its "
                                  "module has no eager_attention_forward to calibrate them with")
    if attention_mask is None:
        q_len, kv_len = query.shape[-2], key.shape[-2]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        attention_mask = (torch.arange(kv_len, device=query.device)[None, :] <= q_pos)[None, None]
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _quantizing_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def quantized(spec: tuple | Callable | None):
    """Within the block, every attention layer sees K/V through the cache format ``spec``."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, spec
    try:
        yield
    finally:
        _ACTIVE = previous


def spec_of(policy: KVPolicy) -> tuple:
    return (policy.k_bits, policy.v_bits, policy.k_group, policy.rotate)


def _cannot_calibrate(model_name: str) -> NotImplementedError:
    return NotImplementedError(
        f"cannot calibrate {model_name}: its transformers implementation does not route attention through "
        "AttentionInterface, so the calibration cannot quantize its K/V. Set VLLM_INT4KV_POLICY to a fixed "
        "policy instead, and measure the candidates through vLLM with `vllm-int4kv quality`")


# -- the session: one loaded model, one reference pass ---------------------------------------------
class Session:
    """A model loaded for calibration plus its full-precision reference on the given token ids.

    ``token_ids``: one list of ids per prompt. Use as a context manager: leaving frees every tensor.
    """

    def __init__(self, model, token_ids: list[list[int]]):
        _register_attention()
        model.set_attn_implementation(ATTN_NAME)
        self.model = model
        self.device = next(model.parameters()).device
        self.name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.inputs = [torch.tensor(ids, device=self.device)[None] for ids in token_ids]
        self.n_tokens = sum(x.shape[1] for x in self.inputs)
        start, calls_before = time.perf_counter(), _calls
        _layers_seen.clear()
        self.reference = [self._logprobs(x, None) for x in self.inputs]
        self.reference_seconds = time.perf_counter() - start
        # the attention layers' indices: hybrid models' Mamba / linear-attention layers never get here
        self.attention_layers = sorted(_layers_seen)
        if _calls == calls_before:
            # e.g. Bloom in transformers: its attention code ignores AttentionInterface, so every
            # candidate would measure a KL of exactly 0 and the cheapest would win unmeasured
            raise _cannot_calibrate(type(model).__name__)
        self.load_seconds = 0.0

    @classmethod
    def load(cls, model: str, token_ids, *, revision=None, dtype=None, trust_remote_code=False,
             device=None):
        """Load ``model`` on ``device`` (None: cuda when available; ``auto``: spread over every GPU) in
        the dtype it is served in (fp32 on CPU); a model that cannot fit is refused before loading."""
        from transformers import AutoConfig, AutoModelForCausalLM

        device = pick_device(device)
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        torch_dtype = compute_dtype(dtype, device, config, model=model, revision=revision)
        check_fits(model, config, torch_dtype, device, trust_remote_code=trust_remote_code)
        _register_attention()  # before loading: from_pretrained checks the name
        start = time.perf_counter()
        try:
            with explained_out_of_memory(model, device):
                hf_model = AutoModelForCausalLM.from_pretrained(
                    model, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                    attn_implementation=ATTN_NAME, **placement(device))
                hf_model = (hf_model if device == SPREAD else hf_model.to(device)).eval()
        except KeyError as exc:  # e.g. Falcon: attention classes looked up by implementation name
            if exc.args != (ATTN_NAME,):
                raise
            raise _cannot_calibrate(model) from exc
        load_seconds = time.perf_counter() - start
        with explained_out_of_memory(model, device):
            session = cls(hf_model, token_ids)
        session.load_seconds = load_seconds
        return session

    @torch.inference_mode()
    def _logprobs(self, ids: torch.Tensor, spec: tuple | Callable | None) -> torch.Tensor:
        with quantized(spec), explained_out_of_memory(self.name, str(self.device)):
            logits = self.model(input_ids=ids, use_cache=False).logits[0]
            # .to: a model spread over GPUs may return its logits on the last one
            return logits.float().log_softmax(-1).to(self.device)  # [S, V]

    @torch.inference_mode()
    def measure(self, name: str, spec: tuple | Callable, bytes_per_token: int | None = None) -> Measurement:
        kl = agree = dnll = 0.0
        n_next = 0
        for ids, ref in zip(self.inputs, self.reference):
            logq = self._logprobs(ids, spec)
            kl += (ref.exp() * (ref - logq)).sum().item()
            agree += (ref.argmax(-1) == logq.argmax(-1)).sum().item()
            nxt = ids[0, 1:, None]
            dnll += (ref[:-1].gather(-1, nxt) - logq[:-1].gather(-1, nxt)).sum().item()
            n_next += nxt.shape[0]
            del logq
        return Measurement(name, bytes_per_token, kl / self.n_tokens, agree / self.n_tokens,
                           dnll / max(n_next, 1))

    @torch.inference_mode()
    def perplexity(self, chunks: list[list[int]], spec: tuple | Callable | None) -> float:
        """Perplexity of the model through the cache format ``spec`` on held-out token chunks."""
        nll, count = 0.0, 0
        for chunk in chunks:
            ids = torch.tensor(chunk, device=self.device)[None]
            logp = self._logprobs(ids, spec)
            nll -= logp[:-1].gather(-1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
        return math.exp(nll / count)

    def close(self) -> None:
        on_cuda = self.device.type == "cuda"
        self.model = self.inputs = self.reference = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def head_dim_of(config) -> int:
    config = getattr(config, "get_text_config", lambda: config)()
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def calibrate(session: Session, head_dim: int, settings: Settings = Settings(), *,
              elem_bytes: int = 2, measure_all: bool = False) -> Calibration:
    """Choose the cheapest candidate whose mean KL is within ``settings.budget``.

    The INT6/INT8 ratio is measured first (its K8V4 pass doubles as that candidate). Candidates then run
    cheapest first and stop at the first within budget (``measure_all``: run them all, for reports).
    K16V16 is never run: it stores K/V unchanged, so its KL is 0 and auto always has an answer.
    """
    start = time.perf_counter()
    k8 = session.measure("k8v4", (8, 4, None, False), KVPolicy(8, 4).slot_bytes(head_dim, elem_bytes))
    k6 = session.measure("k6v4", (6, 4, None, False))  # a measurement, not a storage format
    ratio = k6.kl / max(k8.kl, 1e-12)
    measurements, chosen = [k8, k6], None
    for policy in candidate_policies(head_dim, elem_bytes):  # k4v4 first: its error is always reported
        size = policy.slot_bytes(head_dim, elem_bytes)
        skip_k4 = settings.ratio_early_exit and ratio > settings.tau and policy.name != "k4v4"
        if policy.k_bits == 4 and skip_k4:
            continue
        if policy.name == "k8v4":
            result = k8
        elif not policy.quantized:
            result = Measurement(policy.name, size, 0.0, 1.0, 0.0, exact=True)
            measurements.append(result)
        else:
            result = session.measure(policy.name, spec_of(policy), size)
            measurements.append(result)
        if chosen is None and result.kl <= settings.budget:
            chosen = policy
            if not measure_all:
                break
    seconds = time.perf_counter() - start
    info = {"head_dim": head_dim, "elem_bytes": elem_bytes, "n_prompts": len(session.inputs),
            "n_tokens": session.n_tokens, "device": str(session.device),
            "dtype": str(next(session.model.parameters()).dtype).removeprefix("torch."),
            "bytes_per_token_per_head": chosen.slot_bytes(head_dim, elem_bytes),
            "seconds_load": round(session.load_seconds, 2),
            "seconds_reference": round(session.reference_seconds, 2),
            "seconds_candidates": round(seconds, 2)}
    total = session.load_seconds + session.reference_seconds + seconds
    return Calibration(chosen, measurements, ratio, settings, total, info)
