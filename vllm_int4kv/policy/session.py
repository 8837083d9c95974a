"""A model loaded in HF transformers whose attention sees K/V through a cache format, and what that
format does to its next-token distributions.

The model runs with an attention function of our own (registered through ``AttentionInterface``) that
passes K and V — after RoPE, ``[B, Hkv, S, D]`` — through ``reference.fake_quantize_kv`` before ordinary
SDPA, so every number here is what the paged cache would store and return. One full-precision pass per
prompt gives the reference log-probabilities; each measured format then costs one more pass per prompt.

The error metric, used both for the quality budget and for the INT6/INT8 ratio classifier:

    err(format) = mean over every position t of every prompt of KL(p_fp(. | x<=t) || p_q(. | x<=t)), nats

Why KL and not a raw logit distance: the softmax ignores a common shift of the logits; KL weighs each
vocabulary entry by how likely it is (an unweighted logit MSE is dominated by tens of thousands of
irrelevant tail entries); and KL is what perplexity pays: if the text were drawn from the model itself,
E[NLL_q - NLL_fp] = E[KL(p_fp || p_q)] exactly, so ``exp(err) - 1`` estimates the perplexity increase
(on real text the two track each other; the CLI reports both).
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels.reference import fake_quantize_kv
from .layer_map import PolicyMap
from .layout import KVPolicy
from .placement import (SPREAD, check_fits, compute_dtype, explained_out_of_memory, pick_device,
                        placement)

ATTN_NAME = "int4kv_calibration"


@dataclass
class Measurement:
    """Mean next-token KL vs full precision, top-1 agreement and the NLL change on the prompt text."""

    name: str
    bytes_per_token: float | None
    kl: float
    top1: float
    dnll: float
    exact: bool = False  # not run: the layout stores K and V unchanged (KL is 0 by construction)
    by_genre: dict[str, float] = field(default_factory=dict)  # mean KL over each genre's prompts

    @property
    def ppl_delta(self) -> float:
        """Perplexity increase estimated from the KL, as a fraction."""
        return math.expm1(self.kl)


def prompt_ids(tokenizer, prompt, max_tokens: int) -> list[int]:
    """A prompt as the model sees it, cut to ``max_tokens``: text with BOS where the tokenizer adds one;
    chat messages through the model's chat template (as plain ``role: content`` lines without one)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"][:max_tokens]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)[:max_tokens]
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return tokenizer(text)["input_ids"][:max_tokens]


def prompt_token_ids(model: str, prompts: list, max_tokens: int, *, revision=None, trust_remote_code=False,
                     long_tokens: int | None = None) -> list[tuple[str, list[int]]]:
    """``(genre, token ids)`` per calibration prompt (``(genre, prompt)`` pairs; a bare prompt is genre
    ``text``), each cut to ``max_tokens``, the long document to ``long_tokens``."""
    from transformers import AutoTokenizer

    from .corpus import LONG

    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    out = []
    for item in prompts:
        genre, prompt = item if isinstance(item, tuple) else ("text", item)
        limit = long_tokens if genre == LONG and long_tokens else max_tokens
        ids = prompt_ids(tokenizer, prompt, limit)
        if len(ids) >= 2:
            out.append((genre, ids))
    return out


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


@dataclass
class ErrorProbe:
    """Active instead of a format: every attention layer computes its output from full-precision K/V (which
    the model goes on with) and from K/V through each of ``specs``, and adds up the squared difference:
    ``sums[(layer, name)] = [sum of squares, number of values]``."""

    specs: dict[str, tuple]
    sums: dict = field(default_factory=dict)

    def mean(self, layer: int, name: str) -> float:
        total, count = self.sums[(layer, name)]
        return total / count


def _through(spec, key, value):
    """K/V as the cache format ``spec`` returns them."""
    if callable(spec):
        return spec(key, value)
    if spec is None:
        return key, value
    k_bits, v_bits, k_group, rotate = spec
    d = key.shape[-1]
    return fake_quantize_kv(key, value, k_bits, v_bits, min(k_group or d, d), d, rotate)


def _attend(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("s_aux") is not None or kwargs.get("softcap"):
        return _eager_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _quantizing_attention(module, query, key, value, attention_mask, **kwargs):
    global _calls
    _calls += 1
    index = getattr(module, "layer_idx", None)
    if index is not None:
        _layers_seen.add(index)
    if isinstance(_ACTIVE, ErrorProbe):
        exact = _attend(module, query, key, value, attention_mask, **kwargs)
        for name, spec in _ACTIVE.specs.items():
            out = _attend(module, query, *_through(spec, key, value), attention_mask, **kwargs)[0]
            sums = _ACTIVE.sums.setdefault((index, name), [0.0, 0])
            sums[0] += (out.float() - exact[0].float()).pow(2).sum().item()
            sums[1] += out.numel()
        return exact
    spec = _ACTIVE.for_layer(module) if isinstance(_ACTIVE, PerLayer) else _ACTIVE
    return _attend(module, query, *_through(spec, key, value), attention_mask, **kwargs)


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


def spec_of(policy: KVPolicy) -> tuple | None:
    """What the quantizing attention applies for ``policy`` (None: K/V stored unchanged)."""
    if not policy.quantized:
        return None
    return (policy.k_bits, policy.v_bits, policy.k_group, policy.rotate)


def spec_of_map(policy_map: PolicyMap) -> tuple | PerLayer | None:
    """The same for a map: one format for every layer, or one per layer."""
    if policy_map.single is not None:
        return spec_of(policy_map.single)
    default = None if policy_map.default is None else spec_of(policy_map.default)
    return PerLayer(default, {index: spec_of(policy) for index, policy in policy_map.layers})


def _cannot_calibrate(model_name: str) -> NotImplementedError:
    return NotImplementedError(
        f"cannot calibrate {model_name}: its transformers implementation does not route attention through "
        "AttentionInterface, so the calibration cannot quantize its K/V. Set VLLM_INT4KV_POLICY to a fixed "
        "policy instead, and measure the candidates through vLLM with `vllm-int4kv quality`")


# -- the session: one loaded model, one reference pass ---------------------------------------------
class Session:
    """A model loaded for calibration plus its full-precision reference on the given token ids.

    ``token_ids``: one list of ids per prompt, or ``(genre, ids)`` pairs (measurements then also give the
    KL per genre). Use as a context manager: leaving frees every tensor.
    """

    def __init__(self, model, token_ids: list):
        _register_attention()
        model.set_attn_implementation(ATTN_NAME)
        self.model = model
        self.device = next(model.parameters()).device
        self.name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        pairs = [item if isinstance(item, tuple) else ("text", item) for item in token_ids]
        self.genres = [genre for genre, _ in pairs]
        self.inputs = [torch.tensor(ids, device=self.device)[None] for _, ids in pairs]
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
    def measure(self, name: str, spec: tuple | Callable | PerLayer, bytes_per_token: float | None = None,
                tokens: int | None = None) -> Measurement:
        """The cache format ``spec`` against the reference, on every prompt (on its first ``tokens``
        only, when given: a cheaper look, as the reference of a prefix is the prefix of the reference)."""
        kl = agree = dnll = 0.0
        n_rows = n_next = 0
        genre_kl: dict[str, list[float]] = {}
        for genre, ids, ref in zip(self.genres, self.inputs, self.reference):
            if tokens is not None:
                ids, ref = ids[:, :tokens], ref[:tokens]
            logq = self._logprobs(ids, spec)
            prompt_kl = (ref.exp() * (ref - logq)).sum().item()
            kl += prompt_kl
            sums = genre_kl.setdefault(genre, [0.0, 0])
            sums[0] += prompt_kl
            sums[1] += ids.shape[1]
            agree += (ref.argmax(-1) == logq.argmax(-1)).sum().item()
            nxt = ids[0, 1:, None]
            dnll += (ref[:-1].gather(-1, nxt) - logq[:-1].gather(-1, nxt)).sum().item()
            n_next += nxt.shape[0]
            n_rows += ids.shape[1]
            del logq
        return Measurement(name, bytes_per_token, kl / n_rows, agree / n_rows, dnll / max(n_next, 1),
                           by_genre={genre: total / rows for genre, (total, rows) in genre_kl.items()})

    @torch.inference_mode()
    def attention_errors(self, specs: dict[str, tuple], tokens: int | None = None) -> ErrorProbe:
        """One pass over the prompts (their first ``tokens``): per attention layer and format, the mean
        squared error of the layer's output when only its K/V go through the format (``ErrorProbe``)."""
        probe = ErrorProbe(specs)
        for ids in self.inputs:
            self._logprobs(ids if tokens is None else ids[:, :tokens], probe)
        return probe

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
