"""A tiny random Llama with a locally trained BPE tokenizer, for tests and demos (no download).

``build_tiny_llama(path, seed=0, **overrides)`` writes a Hugging Face model folder (config, fp32
safetensors, tokenizer with a chat template) that vLLM and transformers load like any checkpoint.
The defaults match the shape the project tests against: hidden 128, 2 layers, 4 query heads, 2 KV
heads, head_dim 64. Everything is a deterministic function of ``seed`` and ``overrides``.

Overrides are ``LlamaConfig`` fields (``num_hidden_layers``, ``num_key_value_heads``,
``attention_bias``, ``layer_types`` + ``sliding_window``, ...). ``head_dim`` defaults to 64; if a caller
overrides ``hidden_size`` or ``num_attention_heads`` without ``head_dim``, it becomes
``hidden_size // num_attention_heads`` (the usual Llama convention).

``build_tiny_gpt_oss(path, seed=0)`` writes a tiny gpt-oss (attention sinks, sliding-window layers
alternating with full ones, a mixture of experts), ``build_tiny_hybrid(path, seed=0)`` a tiny
Granite-4-style hybrid (a Mamba-2 layer, then an attention layer) and ``build_tiny_qwen3_next`` a tiny
Qwen3-Next (a Gated DeltaNet layer, then an attention layer; experts), ``build_tiny_bloom`` a tiny
Bloom and ``build_tiny_falcon`` a tiny Falcon of the ALiBi variant (position biases instead of RoPE),
``build_tiny_llama4`` a tiny Llama 4 text model (chunked local attention) and ``build_tiny_gemma(path,
version)`` a tiny Gemma 2 (logit soft-capping) or Gemma 3 text model, with the same tokenizer.
"""
from __future__ import annotations

import functools
import glob
import json
import os
from pathlib import Path

DEFAULTS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    # Wider than Llama's 0.02 so attention is not uniform (a quantized cache then has something to
    # get wrong).
    initializer_range=0.08,
    tie_word_embeddings=False,
)
# Shared by the other architectures' builders: the token ids of SPECIAL_TOKENS and the same wide init.
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
SHARED = {name: DEFAULTS[name] for name in ("max_position_embeddings", "initializer_range",
                                            "tie_word_embeddings")} | SPECIAL_IDS
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS_GLOBS = ("/usr/share/common-licenses/*",)


def _corpus() -> list[str]:
    """Text already on the machine (the license texts); a small built-in text if there is none."""
    texts = []
    for pattern in CORPUS_GLOBS:
        for name in sorted(glob.glob(pattern)):
            if os.path.isfile(name):
                with open(name, encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
    if not texts:  # keeps the builder usable in minimal containers
        texts = [" ".join(f"word{i} and then the number {i * 7} follows" for i in range(3000))]
    return texts


@functools.lru_cache(maxsize=None)
def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with BOS prepended and a chat template.

    Trained once per process (about a second) and shared by every builder, which only saves it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    fields = dict(DEFAULTS)
    if "head_dim" not in overrides and ({"hidden_size", "num_attention_heads"} & overrides.keys()):
        fields["head_dim"] = (overrides.get("hidden_size", fields["hidden_size"])
                              // overrides.get("num_attention_heads", fields["num_attention_heads"]))
    fields.update(overrides)
    return LlamaConfig(vocab_size=vocab_size, **SPECIAL_IDS,
                       architectures=["LlamaForCausalLM"], dtype="float32", **fields)


def build_tiny_llama(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny random Llama (weights from ``seed``) and its tokenizer to ``path``; return it."""
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    return _save(path, LlamaForCausalLM, tiny_llama_config(len(tokenizer), **overrides), tokenizer, seed)


def build_tiny_gpt_oss(path: str | os.PathLike, seed: int = 0, sliding_window: int = 32) -> Path:
    """A tiny random gpt-oss: per-head attention sinks (drawn around 2, so they take a real share of
    each row's softmax), a ``sliding_window`` layer then a full one, 4 experts (2 per token)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    tokenizer = build_tokenizer()
    config = GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
        **SHARED, rope_scaling={"rope_type": "yarn", "factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "truncate": False, "original_max_position_embeddings": 4096})

    def sinks_around_two(model):
        for layer in model.model.layers:
            layer.self_attn.sinks.data.normal_(2.0, 1.0)

    return _save(path, GptOssForCausalLM, config, tokenizer, seed, sinks_around_two)


def build_tiny_hybrid(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny GraniteMoeHybrid: Mamba-2 state pages share vLLM's block pool with the attention pages,
    so vLLM sizes attention blocks to cover a state page (e.g. 192 tokens for K8V4 pages)."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    tokenizer = build_tokenizer()
    config = GraniteMoeHybridConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, shared_intermediate_size=256,
        num_local_experts=0, num_hidden_layers=2, layer_types=["mamba", "attention"], num_attention_heads=4,
        num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=64, position_embedding_type="rope", **SHARED)
    return _save(path, GraniteMoeHybridForCausalLM, config, tokenizer, seed)


def build_tiny_qwen3_next(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Qwen3-Next. vLLM's CPU kernel for its Gated DeltaNet layers wants bf16 and 128-channel
    linear-attention heads, so those are kept at that size."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen3NextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, decoder_sparse_step=1, **SHARED)
    return _save(path, Qwen3NextForCausalLM, config, tokenizer, seed)


def build_tiny_bloom(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Bloom: ALiBi biases (slopes 1/4, 1/16, 1/64, 1/256 for its 4 heads) and no RoPE, 64-channel
    heads, tied embeddings as in the released Blooms."""
    from transformers import BloomConfig, BloomForCausalLM

    tokenizer = build_tokenizer()
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=256, n_layer=2, n_head=4,
                         **SHARED | dict(tie_word_embeddings=True))
    return _save(path, BloomForCausalLM, config, tokenizer, seed)


def build_tiny_falcon(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Falcon of the ALiBi variant (Falcon-RW's): one KV head for 4 query heads (multi-query), and
    vLLM folds 1/sqrt(head_dim) into the slopes it passes."""
    from transformers import FalconConfig, FalconForCausalLM

    tokenizer = build_tokenizer()
    config = FalconConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=2,
                          num_attention_heads=4, alibi=True, multi_query=True,
                          new_decoder_architecture=False, parallel_attn=True, bias=False, **SHARED)
    return _save(path, FalconForCausalLM, config, tokenizer, seed)


def build_tiny_llama4(path: str | os.PathLike, seed: int = 0, attention_chunk_size: int = 32) -> Path:
    """A tiny Llama 4 text model: a RoPE layer with chunked local attention (each token sees only its own
    ``attention_chunk_size``-token chunk; vLLM splits sequences into virtual ones per chunk), then a
    NoPE layer with full attention and query temperature tuning; experts in both."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    tokenizer = build_tokenizer()
    config = Llama4TextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, intermediate_size_mlp=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=2,
        num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=attention_chunk_size,
        no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"], floor_scale=32,
        attn_scale=0.1, architectures=["Llama4ForCausalLM"], **SHARED)
    return _save(path, Llama4ForCausalLM, config, tokenizer, seed)


def build_tiny_gemma(path: str | os.PathLike, version: int = 2, seed: int = 0) -> Path:
    """A tiny Gemma 2 (attention logits soft-capped at 5, strong enough to matter) or Gemma 3 text model
    (q/k norms, separate RoPE bases for local and global layers): a 32-token sliding-window layer, then a
    full one; tied embeddings, as vLLM's Gemma models require."""
    import transformers

    tokenizer = build_tokenizer()
    fields = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=32,
                  query_pre_attn_scalar=64, layer_types=["sliding_attention", "full_attention"],
                  **SHARED | dict(tie_word_embeddings=True))
    if version == 2:
        config = transformers.Gemma2Config(attn_logit_softcapping=5.0, final_logit_softcapping=30.0, **fields)
        model_cls = transformers.Gemma2ForCausalLM
    elif version == 3:
        config, model_cls = transformers.Gemma3TextConfig(**fields), transformers.Gemma3ForCausalLM
    else:
        raise ValueError(f"Gemma version 2 or 3, not {version}")
    config.architectures = [model_cls.__name__]
    return _save(path, model_cls, config, tokenizer, seed)


def _save(path, model_cls, config, tokenizer, seed: int, adjust=None) -> Path:
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
        if adjust is not None:
            adjust(model)
    finally:  # do not disturb the caller's random stream
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with open(path / "generation_config.json", "w") as f:  # greedy unless the request says otherwise
        json.dump(SPECIAL_IDS, f)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
